"""The loss-curve check: accelbench's per-step losses against the peer's, judged against bf16 noise.

Runs that compute the same function of the same weights and batches still differ, because bf16 rounding and
nondeterministic reduction orders (atomics in attention backward kernels, NCCL) are amplified by training.
The **noise floor** is the largest per-step relative loss difference between two such runs:

- the same path run again (``--repeats``, or another device call of the same phase);
- accelbench against itself with a lever off that changes only rounding (``ROUNDING_ONLY``).

With few runs, the check passes when no accelbench-vs-peer pair differs by more than the floor. That rule pits
the most extreme pair of runs against each other, so it fails whenever the lowest and the highest curve belong to
different paths: for runs of one process split at random, half the time or more (``--simulate``). Where there are
runs enough for it to fail at all (``testable``: 4 and 4, 3 and 4, 2 and 6, ...), the check is therefore a
**permutation test** of the two mean curves instead: the statistic is the largest, over the steps, of the gap
between the paths' mean losses (less ``RESOLUTION``) over its standard error, and the test compares it with the
same statistic for every other split of the runs into two groups of those sizes. It passes when the observed split
is not among the most extreme ``ALPHA`` of them (p >= ALPHA). Each path's spread at a step counts as at least
``RESOLUTION`` of the loss: the first steps, before nondeterministic reductions have changed anything, repeat exactly
(or to a few 1e-5, where another machine's kernel autotuning picked other kernels), and a spread of zero would make
the kernels' own rounding gap between the paths look like many standard errors.

Repeats of one build share its deterministic rounding; where they part too late to sample it (one GPU), the check
is the same test over builds instead (``loss_groups.py --between``).

Exit 0: within; 1: outside; 2: no floor or no pair measured. Give it the JSON files of ``compare_peer.py --json``
from one or more calls of the same phase on the same machine kind, run by the same code (a run from before a change
to the objective computes another function):

    python benchmarks/gpu/loss_check.py docs/measurements/h200-x2-2026-11-28-e/peer-7b-finetune-*.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: compare_cpu names the runs' paths
from compare_cpu import ACCELBENCH, PEER  # noqa: E402

# levers whose absence computes the same function in another rounding: padded batches and masked attention
# (as the peer computes them), bf16 logits at every position, transformers' own modules, another reduction order,
# eager decoder layers instead of Inductor's fused kernels, the step's samples on other ranks, DeepSpeed's own
# ZeRO-3 step (another order of the norm's sums, the clip as a reciprocal)
ROUNDING_ONLY = ("packing", "target-loss", "fused-kernels", "zero3-buckets", "compiled-layers", "balanced-ranks",
                 "lean-step")
# gaps below this count as equal: deterministic fp32 runs (CPU) repeat exactly, so their floor is 0, while the
# two paths' kernels still round differently at the 1e-6 level
RESOLUTION = 1e-4
ALPHA = 0.05
EXACT_SPLITS = 20_000  # beyond this many splits, a seeded random sample of this many


@dataclass(frozen=True)
class Curve:
    label: str  # shown in the report, e.g. "call1: accelbench"
    path: str  # "accelbench", "hf-trainer" or "accelbench --without LEVER"
    losses: tuple[float, ...]


@dataclass(frozen=True)
class Gap:
    a: Curve
    b: Curve
    value: float  # largest per-step relative difference
    step: int  # 1-based

    def __str__(self) -> str:
        return f"{self.a.label} vs {self.b.label}: {self.value:.2%} (step {self.step})"


@dataclass(frozen=True)
class MeanTest:
    statistic: float  # largest over the steps of the mean-curve gap (less RESOLUTION) over its standard error
    step: int  # 1-based
    p: float  # share of the splits of the runs whose statistic is as large or larger
    runs: tuple[int, int]  # accelbench runs, peer runs

    def __str__(self) -> str:
        return (f"mean curves ({self.runs[0]} accelbench runs, {self.runs[1]} peer runs): largest gap "
                f"{self.statistic:.2f} standard errors (step {self.step}), permutation p = {self.p:.3f}")


def _spread(values: Sequence[float]) -> float:
    """The runs' variance at a step, at least that of RESOLUTION of the loss: runs that repeat a step (the first
    ones, before nondeterministic reductions have changed anything) or nearly repeat it (another machine's kernel
    autotuning) still carry the kernels' rounding, so a gap of that size is never many standard errors."""
    return max(statistics.variance(values), (RESOLUTION * statistics.fmean(values)) ** 2)


def _standardized_gap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[float, int]:
    """Largest over the steps of |mean(a) - mean(b)|, less RESOLUTION of the mean over all runs (the same for every
    split, so the statistic is symmetric in a and b), over the standard error of the difference (Welch's, each
    path's spread at least RESOLUTION's), and its 1-based step."""
    best, where = 0.0, 1
    for step in range(len(a[0])):
        xs, ys = [c[step] for c in a], [c[step] for c in b]
        gap = abs(statistics.fmean(xs) - statistics.fmean(ys)) - RESOLUTION * abs(statistics.fmean(xs + ys))
        if gap <= 0:
            continue
        value = gap / math.sqrt(_spread(xs) / len(xs) + _spread(ys) / len(ys))
        if value > best:
            best, where = value, step + 1
    return best, where


def testable(n: int, m: int) -> bool:
    """Whether the permutation test of n runs against m can say outside: its smallest p, the observed split alone
    (and its mirror image, which is a split of the same sizes only when n == m), is under ALPHA. 4 and 4: 2/70;
    3 and 4: 1/35; 3 and 3: 2/20, never. Each side needs 2 runs for a spread."""
    return min(n, m) >= 2 and (2 if n == m else 1) / math.comb(n + m, n) < ALPHA


def mean_test(accelbench: Sequence[Curve], peer: Sequence[Curve]) -> MeanTest | None:
    """The permutation test of the two paths' mean curves, None where it could never fail (``testable``)."""
    if not testable(len(accelbench), len(peer)):
        return None
    pooled = [c.losses for c in (*accelbench, *peer)]
    n = len(accelbench)
    observed, step = _standardized_gap(pooled[:n], pooled[n:])
    every = math.comb(len(pooled), n)
    if every <= EXACT_SPLITS:
        splits: Iterable[tuple[int, ...]] = itertools.combinations(range(len(pooled)), n)
    else:  # the observed split, then a seeded sample (with replacement: the usual Monte Carlo p)
        rng = random.Random(0)
        splits = [(*range(n),)] + [tuple(rng.sample(range(len(pooled)), n)) for _ in range(EXACT_SPLITS - 1)]
    hits = total = 0
    for chosen in splits:
        picked = set(chosen)
        value, _ = _standardized_gap([pooled[i] for i in chosen],
                                     [pooled[i] for i in range(len(pooled)) if i not in picked])
        hits += value >= observed
        total += 1
    return MeanTest(observed, step, hits / total, (n, len(peer)))


@dataclass(frozen=True)
class Verdict:
    floor: list[Gap]  # every pair of runs of the same function
    cross: list[Gap]  # every accelbench-vs-peer pair
    means: MeanTest | None = None  # where there are runs enough (testable)

    @property
    def largest_floor(self) -> Gap | None:
        return max(self.floor, key=lambda g: g.value, default=None)

    @property
    def largest_cross(self) -> Gap | None:
        return max(self.cross, key=lambda g: g.value, default=None)

    @property
    def tolerance(self) -> float:
        """The largest-pair rule's floor: the largest same-function gap, at least RESOLUTION."""
        return max(self.largest_floor.value if self.largest_floor else 0.0, RESOLUTION)

    @property
    def pairs_within(self) -> bool | None:
        """The largest-pair rule: no accelbench-vs-peer pair beyond the floor; None when either side was not
        measured."""
        if self.largest_floor is None or self.largest_cross is None:
            return None
        return self.largest_cross.value <= self.tolerance

    @property
    def within(self) -> bool | None:
        """The permutation test where there are runs enough, else the largest-pair rule."""
        if self.means is not None:
            return self.means.p >= ALPHA
        return self.pairs_within


def family(path: str) -> str | None:
    """Which function a run computes: 'accelbench', 'peer', or None for an ablation that changes more
    than rounding (or whose effect on the curve is not argued)."""
    if path == PEER:
        return "peer"
    if path == ACCELBENCH:
        return "accelbench"
    lever = path.removeprefix(ACCELBENCH + " --without ")
    return "accelbench" if lever != path and lever in ROUNDING_ONLY else None


def largest_gap(a: Curve, b: Curve) -> Gap | None:
    """Largest relative per-step difference over the common steps, relative to b."""
    gaps = [(abs(x - y) / max(abs(y), 1e-12), i + 1) for i, (x, y) in enumerate(zip(a.losses, b.losses))]
    if not gaps:
        return None
    value, step = max(gaps)
    return Gap(a, b, value, step)


def check(curves: Iterable[Curve]) -> Verdict:
    runs = [c for c in curves if c.losses and family(c.path)]
    floor, cross = [], []
    for a, b in itertools.combinations(runs, 2):
        if family(a.path) == family(b.path):
            target = floor
        elif {a.path, b.path} == {ACCELBENCH, PEER}:
            target = cross
            a, b = (a, b) if a.path == ACCELBENCH else (b, a)
        else:
            continue  # an ablation against the peer says nothing about accelbench's curve
        gap = largest_gap(a, b)
        if gap:
            target.append(gap)
    means = mean_test([c for c in runs if c.path == ACCELBENCH], [c for c in runs if c.path == PEER])
    return Verdict(floor, cross, means)


# what makes two compare_peer.py files the same phase: the peer's summary of each file
SETTING_KEYS = ("case", "stage", "world_size", "micro_batch", "grad_accum", "steps")


def read_runs(f: Path) -> list[dict]:
    try:
        runs = json.loads(Path(f).read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not text at all
        raise SystemExit(f"{f}: not a compare_peer.py --json file ({e}); give the files its --json wrote")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "path" in r for r in runs):
        raise SystemExit(f"{f}: not a compare_peer.py --json file (a list of runs, each with a 'path'); "
                         "give the files its --json wrote")
    return runs


def curves(runs: Sequence[dict], name: str | None = None) -> list[Curve]:
    """The curves of one call's runs (``compare_peer.py --json`` records: path, repeat, step_losses),
    labelled by path, repeat (when the call made several) and ``name``."""
    repeats = len({r.get("repeat", 0) for r in runs}) > 1
    out = []
    for r in runs:
        losses = tuple(float(x) for x in r.get("step_losses") or ())
        if losses:
            label = r["path"] + (f" #{r.get('repeat', 0) + 1}" if repeats else "")
            out.append(Curve(f"{name}: {label}" if name else label, r["path"], losses))
    return out


def curves_from_json(files: Sequence[Path]) -> list[Curve]:
    """Each run of each compare_peer.py --json file, labelled by its file (when there are several) and repeat.
    Files of another setting (case, stage, GPUs, batch, steps) or run length are refused."""
    stems = [Path(f).stem for f in files]
    names = {f: (stem if stems.count(stem) == 1 else f"{Path(f).parent.name}/{stem}") for f, stem in zip(files, stems)}
    out: list[Curve] = []
    steps, setting = None, None
    for f in files:
        runs = read_runs(f)
        peer = next((r["summary"] for r in runs if r["path"] == PEER and isinstance(r.get("summary"), dict)), None)
        if peer is not None:
            this = {k: peer.get(k) for k in SETTING_KEYS}
            if setting is not None and this != setting[1]:
                raise SystemExit(f"{f}: another setting than {setting[0]} ({this} against {setting[1]}): "
                                 "give files of the same phase on the same machine kind")
            setting = setting or (f, this)
        for c in curves(runs, names[f] if len(files) > 1 else None):
            if steps is not None and len(c.losses) != steps:
                raise SystemExit(f"{f}: {c.path} has {len(c.losses)} steps, other runs {steps}: "
                                 "give files of the same phase and --steps")
            steps = len(c.losses)
            out.append(c)
    return out


def report(verdict: Verdict) -> str:
    lines = []
    if verdict.largest_cross:
        lines.append(f"loss curves, accelbench vs peer: largest per-step relative difference "
                     f"{verdict.largest_cross.value:.2%} (step {verdict.largest_cross.step})")
    if verdict.largest_floor:
        lines.append(f"bf16 noise floor (same function, other rounding or another run): "
                     f"{verdict.largest_floor.value:.2%} (step {verdict.largest_floor.step})")
    for title, gaps in (("same function", verdict.floor), ("accelbench vs peer", verdict.cross)):
        lines += [f"  {title}: {g}" for g in sorted(gaps, key=lambda g: -g.value)]
    if verdict.means is not None:
        lines.append(f"{verdict.means} (within at p >= {ALPHA}; it decides where it can fail)")
    if verdict.within is None:
        lines.append("verdict: none: " + ("no noise floor" if verdict.largest_floor is None else
                                          "no accelbench-vs-peer pair") + " measured (run a repeat or a "
                     "rounding-only ablation, and both paths)")
    else:
        lines.append("verdict: " + ("within" if verdict.within else "OUTSIDE") + " the noise floor"
                     + (" (permutation test)" if verdict.means is not None else " (largest pair against the floor)"))
    return "\n".join(lines)


def simulate(runs: int, trials: int, seed: int = 0, steps: int = 20, drift: float = 0.01) -> dict[str, float]:
    """How often each rule says *outside* for two groups of ``runs`` curves of one process: losses that wander at
    random (``drift`` relative per step) from one start, as runs of one function do once rounding has split them."""
    if runs < 2 or trials < 1:
        raise ValueError(f"simulate needs 2 or more runs a path and 1 or more trials, got {runs} and {trials}")
    rng = random.Random(seed)
    outside = {"largest pair": 0, "permutation test": 0}
    for _ in range(trials):
        group = []
        for i in range(2 * runs):
            loss, curve = 5.0, []
            for _ in range(steps):
                loss *= 1 + rng.gauss(0, drift)
                curve.append(loss)
            group.append(Curve(str(i), ACCELBENCH if i < runs else PEER, tuple(curve)))
        verdict = check(group)
        outside["largest pair"] += not verdict.pairs_within
        if verdict.means is not None:
            outside["permutation test"] += verdict.means.p < ALPHA
    return {rule: n / trials for rule, n in outside.items() if rule == "largest pair" or testable(runs, runs)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="compare_peer.py --json outputs of the same phase")
    p.add_argument("--simulate", type=int, metavar="RUNS",
                   help="instead: how often each rule says outside for RUNS runs a path of one process")
    p.add_argument("--trials", type=int, default=300)
    a = p.parse_args(argv)
    if a.simulate is not None:
        if a.simulate < 2 or a.trials < 1:
            p.error("--simulate needs RUNS >= 2 (a same-path pair) and --trials >= 1")
        for rule, share in simulate(a.simulate, a.trials).items():
            print(f"{a.simulate} runs a path of one process, {a.trials} trials: {rule} says outside in {share:.1%}")
        return 0
    if not a.files:
        p.error("give compare_peer.py --json files (or --simulate RUNS)")
    verdict = check(curves_from_json(a.files))
    print(report(verdict))
    return {True: 0, False: 1, None: 2}[verdict.within]


if __name__ == "__main__":
    sys.exit(main())

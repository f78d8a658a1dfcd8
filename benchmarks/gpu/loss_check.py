"""The loss-curve check: accelbench's per-step losses against the peer's, judged against bf16 noise.

Runs that compute the same function of the same weights and batches still differ, because bf16 rounding and
nondeterministic reduction orders (atomics in attention backward kernels, NCCL) are amplified by training.
The **noise floor** is the largest per-step relative loss difference between two such runs:

- the same path run again (``--repeats``, or another device call of the same phase);
- accelbench against itself with a lever off that changes only rounding (``ROUNDING_ONLY``).

The check passes when no accelbench-vs-peer pair differs by more than the floor (exit 0; 1: outside; 2: no floor
or no pair measured). Give it the JSON files of ``compare_peer.py --json`` from one or more calls of the same phase
on the same machine kind, run by the same code (a run from before a change to the objective computes another
function):

    python benchmarks/gpu/loss_check.py docs/measurements/h200-x2-2026-11-28-e/peer-7b-finetune-*.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: compare_cpu names the runs' paths
from compare_cpu import ACCELBENCH, PEER  # noqa: E402

# levers whose absence computes the same function in another rounding: padded batches and masked attention
# (as the peer computes them), bf16 logits at every position, transformers' own modules, another reduction order
ROUNDING_ONLY = ("packing", "target-loss", "fused-kernels", "zero3-buckets")
# gaps below this count as equal: deterministic fp32 runs (CPU) repeat exactly, so their floor is 0, while the
# two paths' kernels still round differently at the 1e-6 level
RESOLUTION = 1e-4


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
class Verdict:
    floor: list[Gap]  # every pair of runs of the same function
    cross: list[Gap]  # every accelbench-vs-peer pair

    @property
    def largest_floor(self) -> Gap | None:
        return max(self.floor, key=lambda g: g.value, default=None)

    @property
    def largest_cross(self) -> Gap | None:
        return max(self.cross, key=lambda g: g.value, default=None)

    @property
    def within(self) -> bool | None:
        """None when either side was not measured."""
        if self.largest_floor is None or self.largest_cross is None:
            return None
        return self.largest_cross.value <= max(self.largest_floor.value, RESOLUTION)


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
    return Verdict(floor, cross)


# what makes two compare_peer.py files the same phase: the peer's summary of each file
SETTING_KEYS = ("case", "stage", "world_size", "micro_batch", "grad_accum", "steps")


def _read_runs(f: Path) -> list[dict]:
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
        runs = _read_runs(f)
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
    if verdict.within is None:
        lines.append("verdict: none: " + ("no noise floor" if verdict.largest_floor is None else
                                          "no accelbench-vs-peer pair") + " measured (run a repeat or a "
                     "rounding-only ablation, and both paths)")
    else:
        lines.append("verdict: " + ("within" if verdict.within else "OUTSIDE") + " the noise floor")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="compare_peer.py --json outputs of the same phase")
    a = p.parse_args(argv)
    verdict = check(curves_from_json(a.files))
    print(report(verdict))
    return {True: 0, False: 1, None: 2}[verdict.within]


if __name__ == "__main__":
    sys.exit(main())

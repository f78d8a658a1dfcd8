"""Mean loss curves of named groups of runs, and loss_check.py's permutation test between every two groups.

loss_check.py judges accelbench against the peer. This asks the questions around that verdict, over runs pooled
from several calls: does a change that only rounds differently (another kernel set, a bias added in another
rounding) move the mean curve as far as the peer is from accelbench? Each group is a name and its runs, as
``FILE`` (every run in a ``compare_peer.py --json`` file) or ``FILE:PATH`` (the runs of one path in it):

    python benchmarks/gpu/loss_groups.py \\
        --group peer 'a.json:hf-trainer' 'b.json:hf-trainer' \\
        --group eager 'c.json:accelbench --without compiled-layers' d.json

It prints each group's mean and standard deviation at every step, then for each pair of groups the largest
relative gap of the means and the permutation test of ``loss_check.mean_test`` (the first group in the place of
accelbench). A spec that names no runs, or groups of different run lengths, stop it with an error that says so.

Repeats of one build share its deterministic rounding, so a test over runs separates two builds of one function
(docs/performance.md, "Loss curves"). ``--between A,B,.. C,D,..`` therefore also tests two *families of builds*,
each group one build (one code and one set of rounding-only options): the same permutation test, with each build's
mean curve as one sample, so that its noise is the spread between builds, deterministic rounding included. With
builds enough for the test to fail (``loss_check.testable``: 4 and 4, 5 and 3, ...) it exits 0 when the families are
within (p >= ALPHA), 1 when not, and 2 with too few.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_check  # noqa: E402


def group_runs(name: str, specs: Sequence[str]) -> list[loss_check.Curve]:
    """The curves ``specs`` name (``FILE`` or ``FILE:PATH``), labelled as runs of group ``name``."""
    out: list[loss_check.Curve] = []
    for spec in specs:
        file, _, path = spec.partition(":")
        runs = loss_check.read_runs(Path(file))
        picked = [c for c in loss_check.curves(runs, file) if not path or c.path == path]
        if not picked:
            paths = sorted({r["path"] for r in runs})
            raise SystemExit(f"{spec}: no runs with losses{f' of path {path!r}' if path else ''} in {file} "
                             f"(its paths: {', '.join(paths)})")
        out += [loss_check.Curve(f"{name}: {c.label}", name, c.losses) for c in picked]
    return out


def mean_curve(name: str, runs: Sequence[loss_check.Curve]) -> loss_check.Curve:
    """The group's mean loss at every step, as one curve."""
    return loss_check.Curve(f"{name} mean", name, tuple(statistics.fmean(x) for x in zip(*(c.losses for c in runs))))


def report(groups: dict[str, list[loss_check.Curve]]) -> str:
    names = list(groups)
    lines = ["step | " + " | ".join(f"{n} ({len(groups[n])} runs)" for n in names), "---" + " | ---" * len(names)]
    steps = len(next(iter(groups.values()))[0].losses)
    for s in range(steps):
        cells = []
        for n in names:
            xs = [c.losses[s] for c in groups[n]]
            cells.append(f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}")
        lines.append(f"{s + 1} | " + " | ".join(cells))
    lines.append("")
    for a, b in itertools.combinations(names, 2):
        gap = loss_check.largest_gap(mean_curve(a, groups[a]), mean_curve(b, groups[b]))
        test = loss_check.mean_test(groups[a], groups[b])
        tested = (f"largest gap {test.statistic:.2f} standard errors (step {test.step}), permutation p = {test.p:.3f}"
                  if test else "no permutation test (too few runs for it to fail)")
        lines.append(f"{a} vs {b}: means {gap.value:.2%} apart at most (step {gap.step}); {tested}")
    return "\n".join(lines)


SHIFTS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # the changes of function tried by detectable_shift


def detectable_shift(a: Sequence[loss_check.Curve], b: Sequence[loss_check.Curve], first: int) -> float | None:
    """The test's sensitivity: the smallest of SHIFTS by which scaling the losses of family ``a`` from step
    ``first`` on (as a change of function would shift them) makes the test say outside; None if none does."""
    for d in SHIFTS:
        shifted = [loss_check.Curve(c.label, c.path, tuple(x * (1 + d) if s + 1 >= first else x
                                                           for s, x in enumerate(c.losses))) for c in a]
        if loss_check.mean_test(shifted, b).p < loss_check.ALPHA:
            return d
    return None


def between(groups: dict[str, list[loss_check.Curve]], first: Sequence[str], second: Sequence[str]) -> tuple[str, int]:
    """The permutation test of two families of builds over their builds' mean curves, and its exit code (0: within,
    1: outside, 2: too few builds to test)."""
    a, b = [mean_curve(n, groups[n]) for n in first], [mean_curve(n, groups[n]) for n in second]
    lines = [f"families of builds: {', '.join(first)} ({len(a)}) against {', '.join(second)} ({len(b)})"]
    for name, family in ((first, a), (second, b)):
        inner = max((loss_check.largest_gap(x, y) for x, y in itertools.combinations(family, 2)),
                    key=lambda g: g.value, default=None)
        if inner:
            lines.append(f"  within {', '.join(name)}: two builds' means {inner.value:.2%} apart at most "
                         f"({inner.a.path} vs {inner.b.path}, step {inner.step})")
    gap = loss_check.largest_gap(mean_curve("first", a), mean_curve("second", b))
    lines.append(f"  the families' means {gap.value:.2%} apart at most (step {gap.step})")
    test = loss_check.mean_test(a, b)
    if test is None:
        lines.append("verdict: none: too few builds for the test to fail")
        return "\n".join(lines), 2
    within = test.p >= loss_check.ALPHA
    lines.append(f"  over builds: largest gap {test.statistic:.2f} standard errors (step {test.step}), "
                 f"permutation p = {test.p:.3f}")
    steps = len(a[0].losses)
    for first in sorted({1, steps // 2}):
        found = detectable_shift(a, b, first)
        lines.append(f"  sensitivity: the first family's losses scaled from step {first} on by "
                     + (f"{found:.1%} would be outside" if found else f"up to {SHIFTS[-1]:.0%} would still be within")
                     + f" (shifts tried: {SHIFTS[0]:.1%} to {SHIFTS[-1]:.0%})")
    lines.append(f"verdict: {'within' if within else 'OUTSIDE'} the spread between builds (p >= {loss_check.ALPHA})")
    return "\n".join(lines), 0 if within else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", nargs="+", action="append", required=True, metavar="NAME FILE[:PATH]",
                   help="a group's name, then its runs (FILE or FILE:PATH); give two or more groups")
    p.add_argument("--between", nargs=2, metavar=("A,B,..", "C,D,.."),
                   help="also test these two families of builds (group names, each group one build) over their means")
    a = p.parse_args(argv)
    if len(a.group) < 2 or any(len(g) < 2 for g in a.group):
        p.error("give two or more --group NAME FILE[:PATH]..., each with a name and at least one FILE")
    families = [f.split(",") for f in a.between or ()]
    unknown = sorted({n for f in families for n in f} - {g[0] for g in a.group})
    if unknown:
        p.error(f"--between names no --group {', '.join(unknown)}")
    both = sorted(set(families[0]) & set(families[1])) if families else []
    if both:
        p.error(f"--between: {', '.join(both)} in both families; give each build to one")
    groups = {g[0]: group_runs(g[0], g[1:]) for g in a.group}
    steps = {len(c.losses) for runs in groups.values() for c in runs}
    if len(steps) > 1:
        raise SystemExit(f"the groups' runs have different numbers of steps ({', '.join(map(str, sorted(steps)))}); "
                         "give runs of the same --steps")
    print(report(groups))
    if not families:
        return 0
    text, code = between(groups, *families)
    print("\n" + text)
    return code


if __name__ == "__main__":
    sys.exit(main())

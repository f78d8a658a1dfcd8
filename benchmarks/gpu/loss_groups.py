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
                  if test else f"no permutation test (fewer than {loss_check.MIN_RUNS} runs in a group)")
        lines.append(f"{a} vs {b}: means {gap.value:.2%} apart at most (step {gap.step}); {tested}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", nargs="+", action="append", required=True, metavar="NAME FILE[:PATH]",
                   help="a group's name, then its runs (FILE or FILE:PATH); give two or more groups")
    a = p.parse_args(argv)
    if len(a.group) < 2 or any(len(g) < 2 for g in a.group):
        p.error("give two or more --group NAME FILE[:PATH]..., each with a name and at least one FILE")
    groups = {g[0]: group_runs(g[0], g[1:]) for g in a.group}
    steps = {len(c.losses) for runs in groups.values() for c in runs}
    if len(steps) > 1:
        raise SystemExit(f"the groups' runs have different numbers of steps ({', '.join(map(str, sorted(steps)))}); "
                         "give runs of the same --steps")
    print(report(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())

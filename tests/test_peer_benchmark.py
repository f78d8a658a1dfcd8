"""Smoke test of the peer benchmark (HF Trainer + DeepSpeed, benchmarks/hf_peer.py) on the tiny preset."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "hf_peer.py"


@pytest.mark.slow
def test_peer_runs_tiny_and_reports_finite_throughput_and_loss(tmp_path: Path) -> None:
    from accelbench.train.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, n_pretrain=16, n_finetune=16, image_size=56, vocab_size=1024, mmmu=False)
    out = tmp_path / "peer"
    env = {**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(PEER), "--case", "tiny", "--stage", "finetune", "--steps", "3",
                           "--mbs", "2", "--data", str(data), "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PEER tokens/s per process" in proc.stdout
    summary = json.loads((out / "peer_summary.json").read_text())
    assert summary["steps"] == 3 and summary["steady_steps"] == 2  # accelbench's warm-up rule: 1 of 3
    assert math.isfinite(summary["tokens_per_s_per_proc"]) and summary["tokens_per_s_per_proc"] > 0
    assert all(math.isfinite(x) and x > 0 for x in summary["losses"])
    assert 0 < summary["padding_efficiency"] <= 1
    # the very config accelbench writes reached DeepSpeed through TrainingArguments(deepspeed=...)
    assert summary["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert summary["deepspeed_config"]["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in summary["deepspeed_config"]  # torch AdamW from the Trainer: no FusedAdam JIT
    assert (summary["attn_implementation"], summary["optim"]) == ("sdpa", "OptimizerNames.ADAMW_TORCH_FUSED")
    # the peer's rounding variants (the loss check's builds): eager attention and foreach AdamW train the same
    # function, so the losses agree to the run's rounding
    variant = tmp_path / "variant"
    proc = subprocess.run([sys.executable, str(PEER), "--case", "tiny", "--stage", "finetune", "--steps", "3",
                           "--mbs", "2", "--data", str(data), "--quiet", "--out", str(variant), "--attn", "eager",
                           "--optim", "adamw_torch"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    other = json.loads((variant / "peer_summary.json").read_text())
    assert (other["attn_implementation"], other["optim"]) == ("eager", "OptimizerNames.ADAMW_TORCH")
    rounding = {"fp32": 1e-5, "bf16": 2e-3}[summary["dtype"]]  # bf16 on a CPU with native bf16
    assert other["losses"] == pytest.approx(summary["losses"], rel=rounding)


def _gpu_benchmarks():
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]
    try:
        import compare_cpu as cc
        import loss_check
        from compare_peer import print_loss_check
    finally:
        del sys.path[:2]
    return cc, loss_check, print_loss_check


@pytest.mark.slow
def test_peer_zero3_survives_an_image_less_micro_batch_on_one_rank(tmp_path: Path, image_less_rank_data) -> None:
    """LLaVA runs the vision tower on every batch (a text-only sample gets a blank image); transformers' Llava
    skips it without pixel_values, and under ZeRO-3 the other rank then waits in the tower's all-gather.
    The peer runs it as LLaVA does, so the step finishes and the losses stay finite."""
    out = tmp_path / "peer"
    env = {**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(PEER), "--case", "tiny", "--stage", "finetune", "--steps", "4", "--mbs", "1",
                           "--data", str(image_less_rank_data), "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "peer_summary.json").read_text())
    assert summary["steps"] == 4 and summary["zero_stage"] == 3
    assert all(math.isfinite(x) and x > 0 for x in summary["losses"])


def test_gpu_loss_check_uses_every_rounding_only_ablation_as_noise_floor(tmp_path: Path, capsys) -> None:
    cc, _, print_loss_check = _gpu_benchmarks()

    def accel(label: str, losses: list[float]) -> cc.RunResult:
        events = tmp_path / f"{label.replace(' ', '_')}.jsonl"
        events.write_text("".join(json.dumps({"stage": "finetune", "step": i + 1, "time_s": 1.0, "real_tokens": 10,
                                              "loss": x}) + "\n" for i, x in enumerate(losses)))
        return cc.RunResult(label, 0, {"_events": str(events)}, 1.0)

    mine = accel(cc.ACCELBENCH, [10.0, 8.0, 6.0])
    peer = cc.RunResult(cc.PEER, 0, {"losses": [10.0, 8.4, 6.0]}, 1.0)
    ablations = [accel("accelbench --without packing", [10.0, 8.2, 6.0]),
                 accel("accelbench --without selective-recompute", [10.0, 9.0, 6.0])]  # not rounding-only
    print_loss_check([mine, peer], ablations)
    out = capsys.readouterr().out
    assert "accelbench vs peer: largest per-step relative difference 4.76% (step 2)" in out
    assert "accelbench vs accelbench --without packing: 2.44% (step 2)" in out
    assert "selective-recompute" not in out
    assert "verdict: OUTSIDE the noise floor" in out
    cc.write_results_json(str(tmp_path / "r.json"), [mine, peer])
    assert [r["step_losses"] for r in json.loads((tmp_path / "r.json").read_text())] == [[10.0, 8.0, 6.0],
                                                                                          [10.0, 8.4, 6.0]]


def test_loss_check_counts_repeats_across_calls_as_noise_and_pairs_every_accelbench_run_with_every_peer_run(
        tmp_path: Path, capsys) -> None:
    _, loss_check, _ = _gpu_benchmarks()

    def call(name: str, mine: list[float], peer: list[float], unpacked: list[float] | None = None) -> Path:
        runs = [{"path": "accelbench", "repeat": 0, "step_losses": mine},
                {"path": "hf-trainer", "repeat": 0, "step_losses": peer},
                {"path": "accelbench --without loader-workers", "repeat": 0, "step_losses": [1.0, 1.0, 1.0]}]
        if unpacked:
            runs.append({"path": "accelbench --without packing", "repeat": 0, "step_losses": unpacked})
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(runs))
        return f

    # the first call alone: accelbench-vs-peer 3 % at step 2 against a 1 % rounding floor
    first = call("call1", [4.0, 3.09, 2.0], [4.0, 3.0, 2.0], unpacked=[4.0, 3.06, 2.0])
    assert loss_check.main([str(first)]) == 1
    # a second call of the same code lands on the other side of the peer: the repeat spread is the floor
    second = call("call2", [4.0, 2.94, 2.0], [4.0, 3.01, 2.0])
    assert loss_check.main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    verdict = loss_check.check(loss_check.curves_from_json([first, second]))
    assert len(verdict.cross) == 4  # 2 accelbench runs x 2 peer runs; ablations are never paired with the peer
    assert math.isclose(verdict.largest_floor.value, 0.15 / 2.94) and verdict.largest_floor.step == 2
    assert math.isclose(verdict.largest_cross.value, 0.03) and verdict.within
    assert "call1: accelbench vs call2: accelbench: 5.10% (step 2)" in out
    assert "loader-workers" not in out  # not argued to change only rounding: no part of the floor

    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"path": "accelbench", "repeat": 0, "step_losses": [4.0, 3.0]}]))
    with pytest.raises(SystemExit, match="short.json: accelbench has 2 steps, other runs 3"):
        loss_check.main([str(first), str(short)])
    for name, text in (("bad.json", "{"), ("object.json", '{"path": "accelbench"}'), ("binary.json", b"\x1f\x8b\xff")):
        bad = tmp_path / name
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(SystemExit, match=f"{name}: not a compare_peer.py --json file"):
            loss_check.main([str(bad)])

    def with_peer_setting(name: str, world: int) -> Path:
        f = tmp_path / name / "call.json"
        f.parent.mkdir()
        f.write_text(json.dumps([{"path": "hf-trainer", "repeat": 0, "step_losses": [4.0, 3.0, 2.0],
                                  "summary": {"case": "llava1.5-7b", "stage": "finetune", "world_size": world,
                                              "micro_batch": 16, "grad_accum": 1, "steps": 3}}]))
        return f

    x2, x4 = with_peer_setting("x2", 2), with_peer_setting("x4", 4)
    with pytest.raises(SystemExit, match="x4/call.json: another setting than .*x2/call.json"):
        loss_check.main([str(x2), str(x4)])
    # same stems from two folders are told apart; peer runs alone measure no cross pair: no verdict, exit 2
    assert loss_check.main([str(x2), str(with_peer_setting("x2-again", 2))]) == 2
    out = capsys.readouterr().out
    assert "x2/call: hf-trainer vs x2-again/call: hf-trainer" in out and "verdict: none" in out


def test_loss_check_with_four_runs_a_path_tests_the_mean_curves_by_permutation() -> None:
    _, loss_check, _ = _gpu_benchmarks()

    def runs(path: str, finals: list[float]) -> list:
        # steps 1-2 repeat exactly; step 3 spreads from run to run, as a chaotic stretch of training does
        return [loss_check.Curve(f"{path} {i}", path, (4.0, 3.0, x)) for i, x in enumerate(finals)]

    # the extremes fall to different paths, so the largest-pair rule says outside (0.6 / 2.2 = 27 % against
    # a floor of 0.5 / 2.3 = 22 %); the means differ by 0.05, far inside their spread
    spread = loss_check.check(runs("accelbench", [2.3, 2.4, 2.6, 2.8]) + runs("hf-trainer", [2.2, 2.5, 2.6, 2.6]))
    assert spread.largest_cross.value > spread.largest_floor.value
    assert spread.means.runs == (4, 4) and spread.means.step == 3
    assert spread.means.p > 0.5 and spread.within
    # every accelbench run under every peer run: only the observed split and its mirror are this extreme
    shifted = loss_check.check(runs("accelbench", [2.0, 2.05, 2.1, 2.15]) + runs("hf-trainer", [2.6, 2.65, 2.7, 2.75]))
    assert math.isclose(shifted.means.p, 2 / 70) and not shifted.within
    assert "permutation p = 0.029" in loss_check.report(shifted) and "OUTSIDE the noise floor (permutation test)" \
        in loss_check.report(shifted)
    # the statistic is symmetric: the peer above or below gives the same p
    mirrored = loss_check.check(runs("accelbench", [2.6, 2.65, 2.7, 2.75]) + runs("hf-trainer", [2.0, 2.05, 2.1, 2.15]))
    assert math.isclose(mirrored.means.p, 2 / 70)
    # steps every run of a path repeats exactly (or nearly: another machine's kernel autotuning) have no spread of
    # their own: each path's spread counts as at least RESOLUTION of the loss there. A 1.5e-4 offset at step 1 (two
    # sets of kernels rounding differently) is then under one standard error: within
    offset = [loss_check.Curve(c.label, c.path, (4.0006,) + c.losses[1:])
              for c in runs("accelbench", [2.3, 2.4, 2.6, 2.8])]
    rounded = loss_check.check(offset + runs("hf-trainer", [2.2, 2.5, 2.6, 2.6]))
    assert rounded.means.statistic < 1 and rounded.within
    # one run rounds step 1 another way, by 2e-5 of the loss: a spread that small does not make the gap significant
    jitter = [loss_check.Curve(c.label, c.path, (c.losses[0] + 8e-5 * (i == 0),) + c.losses[1:])
              for i, c in enumerate(offset)]
    assert loss_check.check(jitter + runs("hf-trainer", [2.2, 2.5, 2.6, 2.6])).within
    # but a real offset there is found, however noisy the later steps: 1 % at the repeated step 1
    shifted_early = [loss_check.Curve(c.label, c.path, (4.04,) + c.losses[1:])
                     for c in runs("accelbench", [2.3, 2.4, 2.6, 2.8])]
    early = loss_check.check(shifted_early + runs("hf-trainer", [2.2, 2.5, 2.6, 2.6]))
    assert early.means.step == 1 and math.isclose(early.means.p, 2 / 70) and not early.within
    # every step repeats exactly and the paths differ by 5 %: outside
    exact = loss_check.check(runs("accelbench", [2.0] * 4) + runs("hf-trainer", [2.1] * 4))
    assert math.isclose(exact.means.p, 2 / 70) and not exact.within
    tiny = loss_check.check(runs("accelbench", [2.0] * 4) + runs("hf-trainer", [2.0001] * 4))
    assert tiny.within
    # runs of one process: the largest-pair rule calls most groups outside, the test few (seeded, so repeatable)
    rates = loss_check.simulate(4, trials=40, seed=0)
    assert rates["largest pair"] > 0.3 and rates["permutation test"] < 0.15
    assert set(loss_check.simulate(3, trials=2)) == {"largest pair"}
    with pytest.raises(ValueError, match="2 or more runs"):
        loss_check.simulate(1, trials=2)
    # three runs a path: the test could not fail at 5 %, so the largest-pair rule decides
    few = loss_check.check(runs("accelbench", [2.3, 2.4, 2.8]) + runs("hf-trainer", [2.2, 2.5, 2.6]))
    assert few.means is None and few.within is (few.largest_cross.value <= few.largest_floor.value)


def test_peer_takes_the_zero3_config_accelbench_plan_resolved() -> None:
    cc, _, _ = _gpu_benchmarks()
    s = cc.Settings(stage="finetune")

    def plan(**keys) -> cc.RunResult:
        return cc.RunResult(cc.ACCELBENCH, 0, {"_plan": keys}, 1.0)

    dropped = cc.same_zero_config(s, plan(zero_stage=3, zero3_buckets=False))
    assert dropped.peer_args == ("--llava-zero3-buckets",)
    assert cc.same_zero_config(dropped, plan(zero_stage=3, zero3_buckets=True)).peer_args == ()
    assert cc.same_zero_config(s, plan(zero_stage=2, zero3_buckets=False)).peer_args == ()  # no ZeRO-3 buckets
    # --without whole-tower: the peer partitions the vision tower too
    split = cc.same_zero_config(s, plan(zero_stage=3, zero3_buckets=False, whole_tower=False))
    assert split.peer_args == ("--llava-zero3-buckets", "--llava-persistence")
    assert cc.same_zero_config(split, plan(zero_stage=3, zero3_buckets=True, whole_tower=True)).peer_args == ()
    # a failed accelbench run resolved no plan: the peer keeps the config of the last one that did
    failed = cc.RunResult(cc.ACCELBENCH, 0, {"error": "oom"}, 1.0)
    assert cc.same_zero_config(dropped, failed).peer_args == ("--llava-zero3-buckets",)


def test_loss_check_treats_gaps_under_its_resolution_as_equal() -> None:
    _, loss_check, _ = _gpu_benchmarks()
    curve = loss_check.Curve
    exact = [curve("accelbench #1", "accelbench", (5.0, 4.0)), curve("accelbench #2", "accelbench", (5.0, 4.0))]
    assert loss_check.check([*exact, curve("peer", "hf-trainer", (5.0, 4.0001))]).within  # 2.5e-5: fp32 rounding
    assert not loss_check.check([*exact, curve("peer", "hf-trainer", (5.0, 4.01))]).within


def test_loss_groups_compares_the_mean_curves_of_every_two_groups_of_runs(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import loss_groups
    finally:
        del sys.path[0]

    def call(name: str, runs: dict[str, list[float]]) -> str:
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps([{"path": path, "repeat": i, "step_losses": [4.0, 3.0, final]}
                                 for path, finals in runs.items() for i, final in enumerate(finals)]))
        return str(f)

    first = call("first", {"accelbench": [2.0, 2.05], "hf-trainer": [2.6, 2.65]})
    second = call("second", {"accelbench": [2.1, 2.15], "hf-trainer": [2.7, 2.75]})
    other = call("other", {"accelbench --without compiled-layers": [2.3, 2.4, 2.6, 2.8]})
    assert loss_groups.main(["--group", "mine", f"{first}:accelbench", f"{second}:accelbench",
                             "--group", "peer", f"{first}:hf-trainer", f"{second}:hf-trainer",
                             "--group", "eager", other]) == 0
    out = capsys.readouterr().out
    assert "step | mine (4 runs) | peer (4 runs) | eager (4 runs)" in out
    assert "3 | 2.0750 ± 0.0645 | 2.6750 ± 0.0645 | 2.5250 ± 0.2217" in out
    # each group's every run under the other's: only the observed split and its mirror are this extreme
    line = next(x for x in out.splitlines() if x.startswith("mine vs peer:"))
    assert line.startswith("mine vs peer: means 22.43% apart at most (step 3);") and line.endswith("p = 0.029")
    assert "peer vs eager: means 5.94% apart at most (step 3);" in out
    with pytest.raises(SystemExit, match="no runs with losses of path 'hf-trainer' in .*other.json"):
        loss_groups.main(["--group", "a", first, "--group", "b", f"{other}:hf-trainer"])
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"path": "accelbench", "repeat": 0, "step_losses": [4.0, 3.0]}]))
    with pytest.raises(SystemExit, match="different numbers of steps"):
        loss_groups.main(["--group", "a", first, "--group", "b", str(short)])
    with pytest.raises(SystemExit):
        loss_groups.main(["--group", "only", first])


def test_loss_groups_tests_two_families_of_builds_over_their_means(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import loss_check
        import loss_groups
    finally:
        del sys.path[0]
    # the test can fail only where its smallest p is under 5 %: the observed split alone, or with its mirror image
    assert loss_check.testable(4, 4) and loss_check.testable(4, 3) and loss_check.testable(5, 3)
    assert not loss_check.testable(3, 3) and not loss_check.testable(6, 1) and not loss_check.testable(2, 2)

    def builds(prefix: str, finals: list[float]) -> list[str]:
        """One group per build, two runs each, 0.02 apart at the last step."""
        args = []
        for i, final in enumerate(finals):
            f = tmp_path / f"{prefix}{i}.json"
            f.write_text(json.dumps([{"path": "accelbench", "repeat": r, "step_losses": [4.0, 3.0, final + 0.02 * r]}
                                     for r in (0, 1)]))
            args += ["--group", f"{prefix}{i}", str(f)]
        return args

    mine, theirs = "m0,m1,m2,m3,m4", "p0,p1,p2"
    # the builds of each family interleave: a spread between builds larger than the families' gap
    assert loss_groups.main([*builds("m", [2.0, 2.3, 2.1, 2.5, 2.2]), *builds("p", [2.05, 2.4, 2.25]),
                             "--between", mine, theirs]) == 0
    out = capsys.readouterr().out
    assert "families of builds: m0, m1, m2, m3, m4 (5) against p0, p1, p2 (3)" in out
    assert "within m0, m1, m2, m3, m4: two builds' means 19.92% apart at most (m0 vs m3, step 3)" in out
    assert "verdict: within the spread between builds" in out
    # steps 1-2 repeat in every build, so a change of function there shows at once; step 3 spreads by 0.5
    assert "sensitivity: the first family's losses scaled from step 1 on by 0.1% would be outside" in out
    assert out.count("sensitivity:") == 1  # 3 steps: from step 1 and from the middle (step 1) are one line
    # every build of one family under every build of the other: the one most extreme split of 56
    assert loss_groups.main([*builds("m", [2.0, 2.01, 2.02, 2.03, 2.04]), *builds("p", [2.5, 2.51, 2.52]),
                             "--between", mine, theirs]) == 1
    out = capsys.readouterr().out
    assert "permutation p = 0.018" in out and "verdict: OUTSIDE the spread between builds" in out
    # three builds against three could never be outside: no verdict
    assert loss_groups.main([*builds("m", [2.0, 2.01, 2.02]), *builds("p", [2.5, 2.51, 2.52]),
                             "--between", "m0,m1,m2", theirs]) == 2
    assert "verdict: none: too few builds for the test to fail" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: a family names a group that was not given
        loss_groups.main([*builds("m", [2.0, 2.1]), "--between", "m0,m9", "m1"])
    assert "--between names no --group m9" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a build in both families
        loss_groups.main([*builds("m", [2.0, 2.1]), "--between", "m0,m1", "m1"])
    assert "--between: m1 in both families" in capsys.readouterr().err


def _steps_written(events: Path, steps: int) -> None:
    from accelbench.train.metrics import StepRecord

    events.parent.mkdir(parents=True, exist_ok=True)
    with open(events, "w", encoding="utf-8") as fh:
        for n in range(1, steps + 1):
            rec = StepRecord(stage="finetune", step=n, time_s=1.0 + n / 10, real_tokens=1000 * n, padded_tokens=1000 * n,
                             samples=4, loss=10.0 - n, lr=1e-5, grad_norm=1.0, model_flops=6e12 * n,
                             hardware_flops=8e12 * n, mem_allocated=2**30, mem_reserved=2**31, rss=2**30,
                             tokens_per_s_per_proc=0.0, warmup=n <= 1, alloc_retries=n % 2)
            fh.write(json.dumps(rec.to_dict()) + "\n")


@pytest.mark.parametrize("written, salvaged", [(4, True), (3, False)])
def test_a_run_cut_off_by_the_path_timeout_keeps_its_steps_only_if_it_finished_them(tmp_path, monkeypatch, written,
                                                                                     salvaged) -> None:
    cc, _, _ = _gpu_benchmarks()
    s = cc.Settings(case="tiny", steps=4, nproc=2)

    def cut_off(cmd, env, log, timeout):
        _steps_written(tmp_path / "accelbench-0" / "run" / "events.jsonl", written)
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(cc, "_run", cut_off)
    if not salvaged:  # a step short: no figure the other paths could be set beside
        with pytest.raises(subprocess.TimeoutExpired):
            cc.run_accelbench(s, tmp_path, 0, timeout=60)
        return
    r = cc.run_accelbench(s, tmp_path, 0, timeout=60)
    assert "timeout (60 s) after its last step" in r.summary["cut_off"]
    steady = range(2, 5)  # the first step is warm-up
    assert r.tps == pytest.approx(sum(1000 * n for n in steady) / sum(1.0 + n / 10 for n in steady) / 2)
    assert r.summary["loss_last"] == 6.0 and r.summary["alloc_retries"] == 2
    assert cc.step_losses(r) == [9.0, 8.0, 7.0, 6.0]


def test_ablation_rows_keep_their_own_figures_when_the_full_plan_failed(capsys) -> None:
    cc, _, _ = _gpu_benchmarks()
    from compare_peer import print_ablation

    full = cc.RunResult(cc.ACCELBENCH, 0, {"error": "timed out after 260 s"}, 260.0)
    without = cc.RunResult("accelbench --without balanced-ranks", 0,
                           {"tokens_per_s_per_proc": 5491.4, "loss_last": 7.1141}, 192.0)
    print_ablation(full, [without])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[-2] == "| accelbench | failed: timed out after 260 s |"
    assert rows[-1].startswith("| accelbench --without balanced-ranks | 5491.4 |") and rows[-1].endswith("| n/a |")
    assert "7.1141" in rows[-1]

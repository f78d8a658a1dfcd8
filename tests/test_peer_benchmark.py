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


def test_gpu_loss_check_uses_every_rounding_only_ablation_as_noise_floor(tmp_path: Path, capsys) -> None:
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]
    try:
        import compare_cpu as cc
        from compare_peer import print_loss_check
    finally:
        del sys.path[:2]

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
    assert "accelbench vs itself --without packing: 2.44% (step 2)" in out
    assert "selective-recompute" not in out
    cc.write_results_json(str(tmp_path / "r.json"), [mine, peer])
    assert [r["step_losses"] for r in json.loads((tmp_path / "r.json").read_text())] == [[10.0, 8.0, 6.0],
                                                                                          [10.0, 8.4, 6.0]]

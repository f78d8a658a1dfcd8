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

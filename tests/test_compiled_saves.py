"""What a compiled decoder layer saves for its backward is what the memory model counts, with and without lever
"elementwise-recompute", and the lever recomputes no GEMM.

``benchmarks/gpu/layer_saves.py`` compiles one bf16 Llama decoder layer as the trainer does and counts every
tensor autograd saves; it runs in a child process, because the lever sets a process-wide partitioner option.
"""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "layer_saves.py"


def test_saved_tensors_match_the_memory_model_and_no_gemm_is_recomputed():
    out = subprocess.run([sys.executable, str(SCRIPT), "--hidden", "256", "--heads", "4", "--inter", "688",
                          "--tokens", "256", "--samples", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["elementwise_recompute"]: r for r in map(json.loads, out.stdout.splitlines())}
    default, lever = rows[False], rows[True]
    for row in (default, lever):
        assert row["saved_bytes_per_token"] == row["model_bytes_per_token"], row
    h, i = 256, 688
    # the lever saves neither normed output (2·2h), the attention output (2h) and logsumexp (4·heads),
    # nor act·up (2i)
    assert default["saved_bytes_per_token"] - lever["saved_bytes_per_token"] == 2 * 2 * h + 2 * h + 4 * 4 + 2 * i
    assert "float32 (1, 4, 256)" in default["saved"] and "float32 (1, 4, 256)" not in lever["saved"]  # logsumexp
    # the backward's FLOPs are its GEMMs' (dX and dW of the seven projections): the same with the lever
    params = 4 * h * h + 3 * h * i
    assert default["backward_flops_per_token"] == lever["backward_flops_per_token"] == 4 * params

"""benchmarks/gpu/trace_facts.py reads figures the profile summary lacks from a trace; here on small made-up traces
whose answers are known by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from accelbench.train.profiling import Kernel

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "trace_facts.py"


@pytest.fixture(scope="module")
def facts():
    spec = importlib.util.spec_from_file_location("trace_facts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(name: str, ts: float, dur: float, grid=(132, 1, 1)) -> dict:
    return {"cat": "kernel", "pid": 0, "name": name, "ts": ts, "dur": dur, "args": {"grid": list(grid)}}


def test_gemms_beside_a_collective_against_the_same_gemms_alone(facts):
    gemm = "nvjet_sm90_tst_192x192"
    events = [_kernel(gemm, ts, 1000.0) for ts in (0.0, 2000.0, 4000.0)]  # alone: 1 ms each (trace times in µs)
    events += [_kernel("ncclDevKernel_AllGather_RING_LL", 5900.0, 4000.0), _kernel(gemm, 6000.0, 2000.0),  # 2x
               _kernel(gemm, 10000.0, 3000.0, grid=(66, 1, 1)),  # another grid, never alone: not compared
               {"cat": "gpu_memcpy", "pid": 0, "name": "Memcpy DtoH (Device -> Pinned)", "ts": 14000.0, "dur": 3000.0},
               _kernel(gemm, 14500.0, 1000.0)]  # beside a host copy: as fast as alone
    out = facts.gemms_beside(events, steps=2)
    assert out["all-gather"] == {"gemms": 1, "median_time_over_alone": 2.0, "excess_s_per_step": 0.0005}
    assert out["host copy"] == {"gemms": 1, "median_time_over_alone": 1.0, "excess_s_per_step": 0.0}
    assert "reduce-scatter" not in out


def test_the_stretch_before_the_first_decoder_layer(facts):
    def k(name: str, start_ms: float, end_ms: float, window: float = 0.0) -> Kernel:
        return Kernel(start_ms / 1e3, end_ms / 1e3, "forward", name, window, 1, None)

    forward = [k("vectorized_elementwise_kernel", 0, 1), k("ncclDevKernel_AllGather_RING_LL", 1, 3),
               k("nvjet_sm90_tst", 2, 2.5), k("triton_red_fused_rmsnorm", 5, 6), k("nvjet_sm90_tst", 6, 9)]
    # a second forward (another window) without compiled layers adds nothing
    out = facts.before_decoder(forward + [k("nvjet_sm90_tst", 20, 21, window=1.0)], steps=1)
    assert out == pytest.approx({"span_s_per_step": 0.005, "compute_busy_s_per_step": 0.0015,
                                 "collective_s_per_step": 0.002})

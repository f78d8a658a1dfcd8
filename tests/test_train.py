"""End-to-end training on the CPU backend: the embedded default, 2 processes, and 2 loopback nodes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache")}


def _accelbench(*args: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelbench", *args], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=timeout, cwd=str(tmp_path))


def test_embedded_default_fills_every_column(tmp_path):
    out = _accelbench("run", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    run = run_dirs[0]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["schema"] == "accelbench.result/1"
    assert result["environment"]["backend"] == "cpu"
    for stage in ("pretrain", "finetune"):
        m = result["stages"][stage]["metrics"]
        assert m["steps"] == 20 and m["tokens_per_s_per_proc"] > 0
        assert 0 < m["mfu"] < 1 and m["hfu"] >= m["mfu"] and m["mfu_flagperf"] > 0
        assert m["loss_mean_last_n"] < m["loss_first"]  # it learns
        assert (run / stage / "deepspeed_config.json").exists()
    assert 0 <= result["mmmu"]["accuracy"] <= 1 and (run / "mmmu.json").exists()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert len(events) == 40 and {e["stage"] for e in events} == {"pretrain", "finetune"}
    # the printed table: every cell filled; "/" only for MMMU of the pretrain stage
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "(p" in line or "(f" in line]
    pre = next(r for r in rows if "(pretrain)" in r).split("|")[1:-1]
    fin = next(r for r in rows if "(finetune)" in r).split("|")[1:-1]
    header = [c.strip() for c in out.stdout.splitlines()[next(i for i, l in enumerate(out.stdout.splitlines()) if l.startswith("| config"))].split("|")[1:-1]]
    for name, cell in zip(header, pre):
        assert cell.strip() != "/" or name in ("acc(MMMU)",), name
    assert all(cell.strip() != "/" for cell in fin)
    assert "random weights: throughput and memory only" in out.stdout
    report = (run / "report.md").read_text()
    for section in ("#### Environment", "Parallel strategy", "Optimisation strategy", "Pre-run changes",
                    "Input batch sizes", "General metrics", "* Performance"):
        assert section in report


def test_allocator_retries_become_a_report_note():
    from accelbench.train.run import retries_note

    assert retries_note("finetune", {"alloc_retries": 0}) == retries_note("pretrain", {"alloc_retries": None}) == []
    (note,) = retries_note("finetune", {"alloc_retries": 7})
    assert note.startswith("finetune:") and "7 time(s)" in note and "--recompute" in note


def test_reserved_memory_is_summed_per_stream_and_named_where_known():
    from accelbench.train.metrics import reserved_by_stream

    gib = 2**30
    segments = [{"stream": 0, "total_size": 4 * gib, "allocated_size": 3 * gib},
                {"stream": 0, "total_size": 2 * gib, "allocated_size": 0},
                {"stream": 0x51, "total_size": 3 * gib, "allocated_size": gib},
                {"stream": 0x77, "total_size": gib, "allocated_size": gib}]
    out = reserved_by_stream(segments, {0: "compute", 0x51: "offload, back to the device"})
    assert out == {"compute": {"reserved_gib": 6.0, "allocated_gib": 3.0},
                   "offload, back to the device": {"reserved_gib": 3.0, "allocated_gib": 1.0},
                   "stream 0x77": {"reserved_gib": 1.0, "allocated_gib": 1.0}}
    assert list(out) == ["compute", "offload, back to the device", "stream 0x77"]  # the most reserved first


def test_gc_clock_counts_the_collectors_time_once():
    import gc

    from accelbench.train.metrics import GcClock

    with pytest.raises(RuntimeError, match="stage failed"):
        with GcClock() as clock:  # as a stage holds it: closed by return or by error
            garbage = [[] for _ in range(100_000)]
            for a, b in zip(garbage, garbage[1:]):  # cycles only the collector frees
                a.append(b), b.append(a)
            del garbage, a, b
            gc.collect()
            assert clock.take() > 0.0
            assert clock.take() == 0.0
            raise RuntimeError("stage failed")
    gc.collect()
    assert clock.take() == 0.0  # closed: no longer listening


def test_two_processes_gloo(tmp_path):
    out = _accelbench("run", "--nproc-per-node", "2", "--steps", "4", "--no-eval", "--out", str(tmp_path / "r"),
                      tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[pretrain]" in out.stderr and "rank 1]" not in out.stderr  # rank-0 logging by default
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["parallel_strategy"]["world_size"] == 2
    for stage, zero in (("pretrain", 2), ("finetune", 3)):
        entry = result["stages"][stage]
        assert entry["plan"]["zero_stage"] == zero and entry["batch"]["GBS"] == 2 * entry["batch"]["LBS"]
        assert entry["metrics"]["steps"] == 4
        assert entry["plan"]["balanced_ranks"] is True
        assert entry["plan"]["lean_step"] is (zero == 3)
    assert not [a for a in result["adjustments"] if a["what"] == "lean_step"]  # the lean step did stand in
    # lever balanced-ranks deals each step's samples to the ranks by length: the same samples train each step,
    # so the losses (the global token mean) and token counts equal those of LLaVA's order; and lever lean-step
    # updates the weights as DeepSpeed's own ZeRO-3 step does, to rounding: fp32's, or bf16's where the CPU
    # runs bf16 natively (AVX512-BF16, AMX) and the plan keeps the case's bf16
    out = _accelbench("run", "--nproc-per-node", "2", "--steps", "4", "--no-eval", "--out", str(tmp_path / "llava"),
                      "--without", "balanced-ranks,lean-step", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    llava = json.loads((tmp_path / "llava" / "result.json").read_text())
    assert llava["stages"]["finetune"]["plan"]["balanced_ranks"] is False
    assert llava["stages"]["finetune"]["plan"]["lean_step"] is False

    def steps(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "events.jsonl").read_text().splitlines()]

    for event in steps("r"):  # what held a rank back: the collector's seconds on the host; no device allocator
        assert event["gc_s"] >= 0.0 and event["alloc_retries"] is None
    dtype = llava["stages"]["finetune"]["plan"]["dtype"]
    assert dtype == result["stages"]["finetune"]["plan"]["dtype"]
    rounding = {"fp32": 1e-5, "bf16": 1e-3}[dtype]  # bf16 keeps 8 bits: an update can round another way
    for dealt, ordered in zip(steps("r"), steps("llava"), strict=True):
        assert (dealt["stage"], dealt["step"], dealt["real_tokens"]) == \
            (ordered["stage"], ordered["step"], ordered["real_tokens"])
        assert dealt["loss"] == pytest.approx(ordered["loss"], rel=rounding)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path):
    port = str(_free_port())
    common = ["run", "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "--steps", "3", "--no-eval", "--stages", "finetune"]
    env = _env(tmp_path)
    # both "nodes" share one synthesized cache: make it first so they do not race on it
    prep = subprocess.run([sys.executable, "-m", "accelbench", "data", "synth", "--out", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert prep.returncode == 0, prep.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "accelbench", *common, "--node-rank", str(r),
                               "--data", str(tmp_path / "data"), "--out", str(tmp_path / f"node{r}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    result = json.loads((tmp_path / "node0" / "result.json").read_text())
    assert result["parallel_strategy"]["nnodes"] == 2 and result["parallel_strategy"]["world_size"] == 2
    assert result["stages"]["finetune"]["metrics"]["steps"] == 3
    assert result["stages"]["finetune"]["batch"]["GBS"] == 2 * result["stages"]["finetune"]["batch"]["LBS"]


def _tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Read a TFRecord event file: [u64 length][u32 crc][Event proto][u32 crc] per record."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_and_all_rank_logs(tmp_path):
    out = _accelbench("run", "--nproc-per-node", "2", "--steps", "3", "--no-eval", "--stages", "pretrain",
                      "--tensorboard", "--log-all-ranks", "--out", str(tmp_path / "r"), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[pretrain rank 0]" in out.stderr and "[pretrain rank 1]" in out.stderr
    files = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = _tensorboard_scalars(files[0])
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [step for step, _ in scalars["pretrain/loss"]] == [1, 2, 3]
    assert [round(v, 4) for _, v in scalars["pretrain/loss"]] == [round(e["loss"], 4) for e in events]

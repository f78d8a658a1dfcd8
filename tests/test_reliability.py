"""Faults during a run (CPU backend, injected): a dead rank, SIGTERM + resume, out of memory, NaN, a hang,
and result.json that is never torn."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from accelbench.train.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, image_size=56, vocab_size=1024, seed=0, n_pretrain=96, n_finetune=96, mmmu=False)
    return root


def _cmd(data, out, *args):
    return [sys.executable, "-m", "accelbench", "run", "--data", str(data), "--out", str(out), "--no-eval",
            "--quiet", *args]


def _run(cmd, tmp_path, timeout=240, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path),
                          env={**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache"), **env})


def _events(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def _result(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


def _error_line(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("accelbench: error:")][-1]


def test_dead_rank_ends_the_run_then_resume_finishes(data, tmp_path):
    out = tmp_path / "run"
    args = ("--stages", "pretrain", "--steps", "5", "--nproc-per-node", "2", "--save-every", "1",
            "--hang-timeout", "60")
    t0 = time.monotonic()
    proc = _run(_cmd(data, out, *args), tmp_path, ACCELBENCH_INJECT_KILL="pretrain:3:1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60 + 30  # startup + the watchdog time, never a wait forever
    line = _error_line(proc)
    assert "rank 1 was killed by SIGKILL" in line and "continues from pretrain step 2" in line, line
    assert _result(out)["status"] == "failed" and [e["step"] for e in _events(out)] == [1, 2]

    proc = _run([sys.executable, "-m", "accelbench", "run", "--resume", str(out), "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(out)
    assert result["status"] == "ok" and result["stages"]["pretrain"]["metrics"]["steps"] == 5
    assert result["stages"]["pretrain"]["metrics"]["resumed_from_step"] == 2
    assert [e["step"] for e in _events(out)] == [1, 2, 3, 4, 5]


def test_sigterm_saves_and_resume_matches_the_uninterrupted_losses(data, tmp_path):
    args = ("--stages", "pretrain", "--steps", "10")
    ref = _run(_cmd(data, tmp_path / "ref", *args), tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path), env={**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache")})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "events.jsonl").exists() and len((out / "events.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before the signal: make it longer"
    line = [x for x in stderr.splitlines() if x.startswith("accelbench: error:")][-1]
    assert "interrupted by SIGTERM at pretrain step" in line and f"--resume {out}" in line, line
    stopped = len(_events(out))
    assert _result(out)["status"] == "failed"

    resumed = _run([sys.executable, "-m", "accelbench", "run", "--resume", str(out), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _events(out), _events(tmp_path / "ref")
    assert [e["step"] for e in got] == list(range(1, 11))
    assert stopped < 10
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= 1e-5, (g["step"], g["loss"], w["loss"])
        assert abs(g["lr"] - w["lr"]) <= 1e-12


def test_out_of_memory_backs_off_and_is_reported(data, tmp_path):
    out = tmp_path / "run"
    proc = _run(_cmd(data, out, "--stages", "finetune", "--steps", "3", "--save-every", "1"), tmp_path,
                ACCELBENCH_INJECT_OOM="finetune:2:2")  # fails while the micro-batch is above 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(out)
    assert result["status"] == "ok"
    mb = [a for a in result["adjustments"] if a["what"] == "micro_batch" and a["by"] == "trainer"]
    assert len(mb) == 1 and (mb[0]["from"], mb[0]["to"], mb[0]["stage"]) == (4, 2, "finetune")
    assert mb[0]["why"].startswith("out of memory at step 2: ")
    gas = [a for a in result["adjustments"] if a["what"] == "grad_accum" and a["by"] == "trainer"]
    assert (gas[0]["from"], gas[0]["to"]) == (1, 2)
    batch = result["stages"]["finetune"]["batch"]
    assert (batch["LBS"], batch["GAS"], batch["GBS"]) == (2, 2, 4)  # the global batch is kept
    assert [e["step"] for e in _events(out)] == [1, 2, 3] and all(e["samples"] == 4 for e in _events(out))
    assert "out of memory at step 2" in (out / "report.md").read_text()


def test_non_finite_loss_stops_with_the_batch_and_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    proc = _run(_cmd(data, out, "--stages", "pretrain", "--steps", "5"), tmp_path,
                ACCELBENCH_INJECT_NAN="pretrain:3")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "non-finite loss at pretrain step 3" in line, line
    report = json.loads((out / "pretrain" / "nonfinite_step3.json").read_text())
    assert report["step"] == 3 and len(report["batch_ids"]["0"]) == 8
    assert report["last_good_checkpoint"].endswith("step2") and Path(report["last_good_checkpoint"]).is_dir()
    assert [e["step"] for e in _events(out)] == [1, 2]
    result = _result(out)
    assert result["status"] == "failed" and "non-finite loss at pretrain step 3" in result["reason"]


def test_hang_dumps_every_rank_and_names_the_step(data, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = _run(_cmd(data, out, "--stages", "pretrain", "--steps", "4", "--hang-timeout", "3"), tmp_path,
                ACCELBENCH_INJECT_HANG="pretrain:2")
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    line = _error_line(proc)
    assert "no rank finished pretrain step 2 within --hang-timeout 3 s" in line, line
    stacks = (out / "hang" / "stacks-rank0.txt").read_text()
    assert "waiting for step 2" in stacks and "faults.py" in stacks and "before_micro_step" in stacks
    assert _result(out)["failure"]["kind"] == "hang"


WRITER = """
import sys
from pathlib import Path
from accelbench.report.result import write_result
run_dir, i = Path(sys.argv[1]), 0
while True:
    i += 1
    write_result(run_dir, {"schema": "accelbench.result/1", "i": i, "pad": ["x" * 100] * (2000 + i % 500)})
"""


def test_result_json_is_never_torn(tmp_path):
    """Kill the writer at random moments while it rewrites result.json: what is there always parses."""
    import random

    rng = random.Random(0)
    (tmp_path / "result.json").write_text('{"schema": "accelbench.result/1", "i": 0}')
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        time.sleep(0.15 + rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads((tmp_path / "result.json").read_text())
        assert data["schema"] == "accelbench.result/1"

"""Bad training data: fatal problems stop the run in the launcher, before any rank or model starts;
bad records are skipped and counted in result.json."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accelbench.errors import AccelbenchError, DataError
from accelbench.train.run import RunOptions, run

FT = "llava_v1_5_mix665k.json"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from accelbench.train.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, image_size=56, vocab_size=1024, seed=0, n_pretrain=64, n_finetune=64, mmmu=False)
    return root


@pytest.fixture
def data(synth_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_data, root)
    return root


def _records(root):
    return json.loads((root / FT).read_text())


def _bad_records(root):
    """One record of every skippable kind, appended to the good ones."""
    good = _records(root)
    img = next(r for r in good if r.get("image"))
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    long_text = " ".join(["word"] * 6000)
    bad = [
        {"id": "bad-missing", "image": "nowhere/missing.png", "conversations": img["conversations"]},
        {"id": "bad-corrupt", "image": "corrupt.png", "conversations": img["conversations"]},
        {"id": "bad-noconv", "conversations": []},
        {"id": "bad-tokens", "image": img["image"],
         "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-long", "conversations": [{"from": "human", "value": long_text}, {"from": "gpt", "value": "ok"}]},
    ]
    return good, bad


def _opts(root, out, **kw):
    return RunOptions(stages=["finetune"], steps=1, data=str(root), out=str(out), eval_mmmu=False, quiet=True, **kw)


def _nothing_started(out: Path) -> None:
    """No rank ran: no DeepSpeed config, no step events; result.json says failed."""
    assert not (out / "finetune" / "deepspeed_config.json").exists()
    assert not (out / "events.jsonl").exists()
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and result["reason"]


def test_malformed_json_names_file_and_line(data, tmp_path):
    (data / FT).write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(DataError, match=rf"{FT}.* is not valid JSON at line 3"):
        run(_opts(data, tmp_path / "out"))
    _nothing_started(tmp_path / "out")


def test_record_that_is_not_an_object_names_its_index(data, tmp_path):
    (data / FT).write_text(json.dumps(_records(data)[:3] + ["just a string"]))
    with pytest.raises(DataError, match=r"record 3 is a str"):
        run(_opts(data, tmp_path / "out"))


def test_path_outside_the_image_folder(data, tmp_path):
    records = _records(data)
    records[0] = {**records[0], "image": "../../etc/passwd"}
    (data / FT).write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"'../../etc/passwd' escapes the image folder"):
        run(_opts(data, tmp_path / "out"))
    _nothing_started(tmp_path / "out")


@pytest.mark.parametrize("which, reason", [(0, "missing_image"), (1, "corrupt_image"), (2, "no_conversations"),
                                           (3, "image_token_mismatch"), (4, "too_long")])
def test_bad_samples_fail_names_the_record(data, tmp_path, which, reason):
    good, bad = _bad_records(data)
    (data / FT).write_text(json.dumps(good + [bad[which]]))
    with pytest.raises(DataError) as info:
        run(_opts(data, tmp_path / "out", bad_samples="fail"))
    message = str(info.value)
    assert f"record {bad[which]['id']!r}" in message and reason in message and "--bad-samples skip" in message
    _nothing_started(tmp_path / "out")


def test_too_many_bad_records_stop_before_any_model(data, tmp_path):
    good, bad = _bad_records(data)
    (data / FT).write_text(json.dumps(good + bad))  # 5 of 69: over the default 1 %
    with pytest.raises(DataError, match=r"5 of 69 records .* exceeds --max-bad-fraction 0.01"):
        run(_opts(data, tmp_path / "out"))
    _nothing_started(tmp_path / "out")


@pytest.mark.slow
def test_bad_records_are_skipped_and_counted(data, tmp_path):
    good, bad = _bad_records(data)
    (data / FT).write_text(json.dumps(good + bad))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "accelbench", "run", "--stages", "finetune", "--steps", "1",
                           "--no-eval", "--quiet", "--data", str(data), "--out", str(out),
                           "--max-bad-fraction", "0.1"],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    counted = result["stages"]["finetune"]["data"]["bad_records"]
    assert counted["bad"] == 5 and counted["total"] == 69
    assert counted["counts"] == {r: 1 for r in ("corrupt_image", "image_token_mismatch", "missing_image",
                                                "no_conversations", "too_long")}
    assert counted["examples"]["too_long"] == ["bad-long"]
    assert result["stages"]["finetune"]["data"]["used"] == 64
    assert result["stages"]["finetune"]["metrics"]["data"]["bad_records"]["bad"] == 5


def test_unknown_error_types_stay_clear(data, tmp_path):
    """A missing tokenizer is a data error with the fix, not a traceback."""
    shutil.rmtree(data / "tokenizer")
    with pytest.raises(AccelbenchError, match=r"tokenizer .* cannot be loaded"):
        run(_opts(data, tmp_path / "out"))

"""Impossible options are refused before any heavy import, with one line naming the option and what is allowed."""
import json
import subprocess
import sys

import pytest

from accelbench.errors import ConfigError
from accelbench.train.launch import LaunchSpec
from accelbench.train.run import RunOptions, validate


@pytest.mark.parametrize("change, words", [
    ({"mbs": "0"}, ["--mbs", "positive integer"]),
    ({"mbs": "lots"}, ["--mbs", "'auto'"]),
    ({"seq": 10}, ["--seq 10", "17.."]),
    ({"seq": 100000}, ["--seq 100000", "tokens"]),
    ({"zero_stage": 5}, ["--zero-stage 5", "0, 1, 2 or 3"]),
    ({"lr": 0.0}, ["--lr 0.0", "between 0 and 1"]),
    ({"lr": 3.0}, ["--lr 3.0", "between 0 and 1"]),
    ({"gas": 0}, ["--gas 0", "1 or more"]),
    ({"case": "llava9-70b"}, ["llava9-70b", "tiny"]),
    ({"launch": LaunchSpec(nnodes=2, node_rank=2, master_port=29500)}, ["--node-rank 2", "0..1"]),
    ({"save_every": 0}, ["--save-every 0", "1 or more"]),
    ({"hang_timeout": -1.0}, ["--hang-timeout -1.0", "0 turns it off"]),
    ({"llm": "/nonexistent/llm"}, ["--llm", "no config.json"]),
    ({"resume": "/nonexistent/run"}, ["--resume", "no run_config.json"]),
])
def test_impossible_option_is_refused(change, words):
    with pytest.raises(ConfigError) as info:
        validate(RunOptions(**change))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def _hf_folder(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_weights_that_do_not_match_the_preset(tmp_path):
    # the tiny preset's LLM: hidden 64; these weights were made for a wider model
    llm = _hf_folder(tmp_path / "llm", model_type="llama", hidden_size=4096, num_hidden_layers=32,
                     num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
    with pytest.raises(ConfigError, match=r"--llm .* does not match the shapes of --case tiny: hidden_size 4096"):
        validate(RunOptions(llm=llm))
    # a full LLaVA config: the nested vision_config is what counts
    tower = _hf_folder(tmp_path / "tower", vision_config={"hidden_size": 1024, "image_size": 336, "patch_size": 14})
    with pytest.raises(ConfigError, match=r"--vision-tower .* hidden_size 1024 \(preset"):
        validate(RunOptions(vision_tower=tower))


def test_refused_before_torch_is_imported(tmp_path):
    """The command line's own path: exit 2, one line, and torch was never imported."""
    code = ("import sys; from accelbench.cli import main; rc = main(['run', '--zero-stage', '7']); "
            "print('TORCH', 'torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert "TORCH False 2" in out.stdout, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == ["accelbench: error: --zero-stage 7 is unknown: choose 0, 1, 2 or 3"]

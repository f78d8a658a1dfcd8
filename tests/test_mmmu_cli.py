"""`accelbench eval mmmu` end to end on a saved model folder: one rank, and two ranks gathered."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from accelbench.cases import PRESETS
    from accelbench.train.synth import synthesize

    root = tmp_path_factory.mktemp("mmmu_cli")
    paths = synthesize(root / "data", n_pretrain=8, n_finetune=8, image_size=56, seed=3)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    image = tok.convert_tokens_to_ids("<image>")
    model = LlavaForConditionalGeneration._from_config(PRESETS["tiny"].llava_config(image_token_id=image,
                                                                                    pad_token_id=tok.pad_token_id))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", Path(paths["mmmu"]), root


def _eval(model, data, out, *extra):
    return subprocess.run([sys.executable, "-m", "accelbench", "eval", "mmmu", "--model", str(model), "--data",
                           str(data), "--limit", "8", "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_two_ranks_gather_the_same_answers_as_one(model_and_data):
    model, data, root = model_and_data
    one = _eval(model, data, root / "one" / "mmmu.json")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _eval(model, data, root / "two" / "mmmu.json", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((root / "one" / "mmmu.json").read_text())
    b = json.loads((root / "two" / "mmmu.json").read_text())
    assert a["overall"]["total"] == b["overall"]["total"] == 8
    by_id = lambda r: {q["id"]: (q["response"], q["pred"], q["correct"]) for q in r["questions"]}  # noqa: E731
    assert by_id(a) == by_id(b)
    assert a["overall"] == b["overall"]
    assert (root / "two" / "mmmu.rank1.json").exists()
    printed = json.loads(two.stdout.strip().splitlines()[-1])
    assert printed["questions"] == 8 and printed["accuracy"] == b["overall"]["accuracy"]

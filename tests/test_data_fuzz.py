"""Fuzzing the data front door: anything in a data file either loads or raises DataError."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from accelbench.errors import DataError
from accelbench.train.data import load_records, validate_records
from accelbench.train.synth import synthesize

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
# Values near the real schema, so the fuzzer reaches the validation logic, not just the parser.
plausible_text = st.sampled_from(["<image>", "<image>\nWhat?", "a red circle", "", "word " * 40, "\ud800"]) | st.text(max_size=30)
turns = st.lists(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]) | json_values,
                           "value": plausible_text | json_values}),
    max_size=6,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8) | st.integers() | json_values,
        "image": st.sampled_from(["a.png", "nope.png", "broken.png", "", "sub/a.png", "x" * 300, "../a.png",
                                  "/abs.png", "a\x00b"]) | json_values,
        "conversations": turns | json_values,
    },
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    paths = synthesize(tmp_path_factory.mktemp("synth"), n_pretrain=8, n_finetune=8, mmmu=False)
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    return AutoTokenizer.from_pretrained(paths["tokenizer"]), folder


def load_and_validate(path: Path, env) -> None:
    tokenizer, folder = env
    try:
        loaded = load_records(path)
        for template in ("vicuna_v1", "plain"):
            kept, bad = validate_records(loaded, folder, tokenizer=tokenizer, model_max_length=64,
                                         template=template, max_bad_fraction=1.0)
            assert len(kept) + bad.bad == len(loaded)
            json.dumps(bad.to_dict())
    except DataError:
        pass  # the only acceptable failure


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes(env, data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(data)
        load_and_validate(path, env)


@FUZZ
@given(value=json_values)
def test_random_json_values(env, value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.json"
        path.write_text(json.dumps(value))
        load_and_validate(path, env)


@FUZZ
@given(value=st.lists(records, max_size=6), as_jsonl=st.booleans())
def test_record_like_values(env, value, as_jsonl: bool):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("d.jsonl" if as_jsonl else "d.json")
        text = "\n".join(json.dumps(r) for r in value) if as_jsonl else json.dumps(value)
        path.write_text(text)
        load_and_validate(path, env)


@pytest.mark.parametrize("text", ["[" * 100_000, "[1" + "0" * 5000 + "]", '"\\ud800"', "\ufeff[]", "[NaN]"])
def test_pathological_json(env, tmp_path: Path, text: str):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_and_validate(path, env)

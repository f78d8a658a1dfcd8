"""The synthetic data set: real formats, a loadable tokenizer, and the real loaders reading it."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from accelbench.train.data import LlavaDataset, collate, load_records, validate_records
from accelbench.train.synth import IMAGE_TOKEN, synthesize

HAVE_MMMU = importlib.util.find_spec("accelbench.eval.mmmu_synth") is not None


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    start = time.perf_counter()
    paths = synthesize(tmp_path_factory.mktemp("synth"), mmmu=HAVE_MMMU)  # the defaults
    assert time.perf_counter() - start < 10
    return paths


@pytest.fixture(scope="module")
def tok(synth):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(synth["tokenizer"])


def test_tokenizer_layout(tok):
    assert len(tok) == 1024
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 1023
    assert tok.padding_side == "right" and tok.model_max_length == 2048
    ids = tok("a red circle").input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "a red circle"
    unseen = tok("日本 ✓", add_special_tokens=False).input_ids  # characters not in the corpus
    assert 0 not in unseen and all(i < 1024 for i in unseen)  # byte fallback, no <unk>
    assert tok.decode(unseen) == "日本 ✓"
    assert tok("<image>", add_special_tokens=False).input_ids == [1023]


def test_files_are_in_the_real_formats(synth):
    pretrain = json.loads(synth["pretrain_json"].read_text())
    finetune = json.loads(synth["finetune_json"].read_text())
    assert synth["pretrain_json"].name == "blip_laion_cc_sbu_558k.json"
    assert synth["finetune_json"].name == "llava_v1_5_mix665k.json"
    assert len(pretrain) == len(finetune) == 256
    for record in pretrain + finetune:
        assert set(record) <= {"id", "image", "conversations"}
        roles = [t["from"] for t in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        if "image" in record:
            assert (synth["image_folder"] / record["image"]).is_file()
            assert record["conversations"][0]["value"].count(IMAGE_TOKEN) == 1
    assert all(len(r["conversations"]) == 2 and "image" in r for r in pretrain)
    text_only = sum("image" not in r for r in finetune) / len(finetune)
    assert 0.02 <= text_only <= 0.12
    turns = {len(r["conversations"]) // 2 for r in finetune}
    assert min(turns) == 1 and max(turns) <= 6 and len(turns) >= 4
    manifest = json.loads(synth["manifest"].read_text())
    assert manifest["counts"]["pretrain"] == 256 and manifest["params"]["seed"] == 0
    assert manifest["token_ids"]["image"] == 1023
    if HAVE_MMMU:
        assert any(synth["mmmu"].iterdir())


def test_pretrain_through_real_loaders(synth, tok):
    records = load_records(synth["pretrain_json"])
    kept, bad = validate_records(records, synth["image_folder"], tokenizer=tok, model_max_length=2048,
                                 template="plain")
    assert bad.bad == 0 and len(kept) == 256
    ds = LlavaDataset(kept, synth["image_folder"], tok, template="plain", image_tokens=576, image_token_id=1023,
                      image_size=336, model_max_length=2048)
    lengths = [len(ds.encode(r)[0]) for r in kept]
    assert all(576 + 10 <= n <= 576 + 60 for n in lengths)
    assert max(lengths) - min(lengths) >= 20  # captions really vary
    batch = collate([ds[i] for i in range(4)], tok.pad_token_id)
    assert batch["pixel_values"].shape == (4, 3, 336, 336)


def test_finetune_through_real_loaders(synth, tok):
    records = load_records(synth["finetune_json"])
    kept, bad = validate_records(records, synth["image_folder"], tokenizer=tok, model_max_length=2048)
    assert bad.bad == 0
    ds = LlavaDataset(kept, synth["image_folder"], tok, template="vicuna_v1", image_tokens=576,
                      image_token_id=1023, image_size=336, model_max_length=2048)
    lengths = sorted(len(ds.encode(r)[0]) for r in kept)
    assert all(n <= 2048 for n in lengths)
    median, longest = lengths[len(lengths) // 2], lengths[-1]
    assert median < 576 + 300 and longest > 576 + 700  # mostly short, with a long tail
    assert all(any(l != -100 for l in ds.encode(r)[1]) for r in kept)  # every sample trains something
    text_only = [i for i, r in enumerate(kept) if "image" not in r][:2]
    batch = collate([ds[i] for i in [0, 1, *text_only]], tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == sum("image" in kept[i] for i in [0, 1])  # text-only add none
    assert sum(n < 0 for n in ds.modality_lengths) == sum("image" not in r for r in kept)


def test_deterministic_and_cached(tmp_path: Path):
    a = synthesize(tmp_path / "a", n_pretrain=24, n_finetune=24, seed=7, mmmu=False)
    b = synthesize(tmp_path / "b", n_pretrain=24, n_finetune=24, seed=7, mmmu=False)
    for key in ("pretrain_json", "finetune_json"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert (a["tokenizer"] / "tokenizer.json").read_bytes() == (b["tokenizer"] / "tokenizer.json").read_bytes()
    first = sorted(p.relative_to(a["image_folder"]) for p in a["image_folder"].rglob("*.png"))
    assert first == sorted(p.relative_to(b["image_folder"]) for p in b["image_folder"].rglob("*.png"))
    assert all((a["image_folder"] / p).read_bytes() == (b["image_folder"] / p).read_bytes() for p in first)

    stamp = a["manifest"].stat().st_mtime_ns
    assert synthesize(tmp_path / "a", n_pretrain=24, n_finetune=24, seed=7, mmmu=False) == a
    assert a["manifest"].stat().st_mtime_ns == stamp  # cache hit: nothing rewritten
    synthesize(tmp_path / "a", n_pretrain=24, n_finetune=24, seed=8, mmmu=False)
    assert a["pretrain_json"].read_bytes() != b["pretrain_json"].read_bytes()  # new params: rebuilt


def test_incomplete_folder_is_rebuilt(tmp_path: Path):
    paths = synthesize(tmp_path, n_pretrain=8, n_finetune=8, mmmu=False)
    paths["finetune_json"].unlink()
    again = synthesize(tmp_path, n_pretrain=8, n_finetune=8, mmmu=False)
    assert again["finetune_json"].is_file()

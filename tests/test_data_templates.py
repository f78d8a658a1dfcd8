"""Templates, label masking, loading, validation, collation and sampling of LLaVA records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from accelbench.errors import AccelbenchError, DataError
from accelbench.train.data import (
    IGNORE_INDEX, VICUNA_SYSTEM, BadRecords, EpochAfterEpoch, LengthGroupedSampler, LlavaDataset, collate,
    deal_by_length, load_records, validate_records,
)
from accelbench.train.synth import synthesize

IMG_TOKENS = 16  # the tiny preset
IMG_ID = 1023


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthesize(tmp_path_factory.mktemp("synth"), n_pretrain=24, n_finetune=24, mmmu=False)


@pytest.fixture(scope="module")
def tok(synth: dict[str, Path]):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(synth["tokenizer"])


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    return tmp_path


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def dataset(records, folder, tok, template, max_len=2048) -> LlavaDataset:
    return LlavaDataset(records, folder, tok, template=template, image_tokens=IMG_TOKENS, image_token_id=IMG_ID,
                        image_size=28, model_max_length=max_len)


def conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# --------------------------------------------------------------------------- templates


def test_plain_masks_everything_but_caption(tok, folder):
    rec = {"id": "p", "image": "a.png", "conversations": conv("Describe it.\n<image>", "A red square.")}
    sample = dataset([rec], folder, tok, "plain")[0]
    caption = enc(tok, "A red square.\n")
    assert sample["input_ids"].tolist() == [tok.bos_token_id] + [IMG_ID] * IMG_TOKENS + caption
    assert sample["labels"].tolist() == [IGNORE_INDEX] * (1 + IMG_TOKENS) + caption
    assert sample["pixel_values"].shape == (3, 28, 28)


def test_vicuna_single_turn_moves_image_first_and_trains_answer_only(tok, folder):
    rec = {"id": "v", "image": "a.png", "conversations": conv("What color is it?\n<image>", "It is red.")}
    sample = dataset([rec], folder, tok, "vicuna_v1")[0]
    prompt = ([tok.bos_token_id] + enc(tok, VICUNA_SYSTEM + " USER: ") + [IMG_ID] * IMG_TOKENS
              + enc(tok, "\nWhat color is it? ASSISTANT:"))
    answer = enc(tok, "It is red.") + [tok.eos_token_id]
    assert sample["input_ids"].tolist() == prompt + answer
    assert sample["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    text = tok.decode([i for i in sample["input_ids"].tolist() if i != IMG_ID])
    assert text.startswith("<s> " + VICUNA_SYSTEM + " USER: ")
    assert "ASSISTANT: It is red.</s>" in text.replace("  ", " ")


def test_vicuna_multi_turn_labels_token_by_token(tok, folder):
    turns = conv("<image>\nWhat shape?", "A circle.", "Which colour?", "Blue.", "Where is it?", "In the top left.")
    sample = dataset([{"id": "m", "image": "a.png", "conversations": turns}], folder, tok, "vicuna_v1")[0]
    expected_ids: list[int] = [tok.bos_token_id]
    expected_labels: list[int] = [IGNORE_INDEX]
    prompts = [(VICUNA_SYSTEM + " USER: ", "\nWhat shape? ASSISTANT:"), ("USER: Which colour? ASSISTANT:",),
               ("USER: Where is it? ASSISTANT:",)]
    for parts, answer in zip(prompts, ("A circle.", "Blue.", "In the top left.")):
        prompt = enc(tok, parts[0]) + ([IMG_ID] * IMG_TOKENS + enc(tok, parts[1]) if len(parts) > 1 else [])
        trained = enc(tok, answer) + [tok.eos_token_id]
        expected_ids += prompt + trained
        expected_labels += [IGNORE_INDEX] * len(prompt) + trained
    assert sample["input_ids"].tolist() == expected_ids
    assert sample["labels"].tolist() == expected_labels
    trained_text = tok.decode([l for l in expected_labels if l != IGNORE_INDEX])
    assert trained_text == "A circle.</s> Blue.</s> In the top left.</s>"


def test_text_only_record_has_no_image(tok, folder):
    rec = {"id": "t", "conversations": conv("Tell me a fact.", "Squares have four sides.")}
    sample = dataset([rec], folder, tok, "vicuna_v1")[0]
    assert sample["pixel_values"] is None
    assert IMG_ID not in sample["input_ids"].tolist()
    answer = enc(tok, "Squares have four sides.") + [tok.eos_token_id]
    assert sample["labels"].tolist()[-len(answer):] == answer
    assert all(l == IGNORE_INDEX for l in sample["labels"].tolist()[:-len(answer)])


def test_truncation_after_expansion_cuts_tail_identically(tok, folder):
    rec = {"id": "v", "image": "a.png", "conversations": conv("<image>\nDescribe.", "word " * 100)}
    full = dataset([rec], folder, tok, "vicuna_v1")[0]
    cut = dataset([rec], folder, tok, "vicuna_v1", max_len=80)[0]
    assert len(cut["input_ids"]) == 80
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[:80]
    assert cut["labels"].tolist() == full["labels"].tolist()[:80]
    with pytest.raises(DataError, match="image tokens"):
        dataset([rec], folder, tok, "vicuna_v1", max_len=30)[0]


def test_lengths_and_modality_lengths(tok, folder):
    recs = [{"id": "a", "image": "a.png", "conversations": conv("<image>\nhi", "one two three")},
            {"id": "b", "conversations": conv("hi there", "four")}]
    ds = dataset(recs, folder, tok, "vicuna_v1")
    assert ds.lengths == [5 + IMG_TOKENS, 3]  # LLaVA-style word count ("<image>" included)
    assert ds.modality_lengths == [5 + IMG_TOKENS, -3]


# --------------------------------------------------------------------------- collate


def test_collate_pads_right_and_counts_tokens(tok, folder):
    recs = [{"id": "a", "image": "a.png", "conversations": conv("<image>\nWhat?", "Red.")},
            {"id": "b", "conversations": conv("Hi", "Hello there, friend.")},
            {"id": "c", "image": "a.png", "conversations": conv("<image>\nWhere?", "In the top left of the image.")}]
    ds = dataset(recs, folder, tok, "vicuna_v1")
    samples = [ds[i] for i in range(3)]
    batch = collate(samples, pad_token_id=tok.pad_token_id)
    lens = [len(s["input_ids"]) for s in samples]
    width = max(lens)
    assert batch["seq_lens"] == lens and batch["ids"] == ["a", "b", "c"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["real_tokens"] == sum(lens) == int(batch["attention_mask"].sum())
    assert batch["padded_tokens"] == 3 * width
    assert batch["pixel_values"].shape == (2, 3, 28, 28)  # only the two image samples
    for row, n in enumerate(lens):
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, :n].tolist() == samples[row]["labels"].tolist()
    assert collate([samples[1]], 0)["pixel_values"] is None


# --------------------------------------------------------------------------- sampler


def sampler_lengths() -> list[int]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 500, (103,), generator=g).tolist()
    return [n if i % 7 else -n for i, n in enumerate(lengths)]  # every 7th is text-only


def test_sampler_is_deterministic_and_epoch_dependent():
    lengths = sampler_lengths()
    a = list(LengthGroupedSampler(lengths, 4, 2, 0, seed=3))
    assert a == list(LengthGroupedSampler(lengths, 4, 2, 0, seed=3))
    s = LengthGroupedSampler(lengths, 4, 2, 0, seed=3)
    s.set_epoch(1)
    assert list(s) != a


def test_sampler_ranks_share_work_evenly_and_cover_everything():
    lengths = sampler_lengths()
    per_rank = [list(LengthGroupedSampler(lengths, 4, 3, r, seed=0)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(len(lengths)))
    assert len(seen) - len(lengths) < 4 * 3  # wrap-around padding is less than one megabatch


def test_sampler_groups_modalities_and_lengths():
    lengths = sampler_lengths()
    s = LengthGroupedSampler(lengths, 4, 1, 0, seed=0)
    batches = list(s)
    mixed = [k for k, b in enumerate(batches) if len({lengths[i] > 0 for i in b}) > 1]
    # Only LLaVA's leftover megabatch (mm tail + text tail, up to 2 batches) and the
    # wrap-around padding after it may mix modalities.
    assert all(k >= len(batches) - 3 for k in mixed)
    for batch in batches[:-2]:
        ls = [abs(lengths[i]) for i in batch]
        assert ls == sorted(ls, reverse=True)


def test_sampler_resume_skips_batches():
    lengths = sampler_lengths()
    full = list(LengthGroupedSampler(lengths, 4, 2, 1, seed=5, epoch=2))
    resumed = LengthGroupedSampler(lengths, 4, 2, 1, seed=5)
    resumed.set_epoch(2, start_index=3)
    assert list(resumed) == full[3:] and len(resumed) == len(full) - 3


def test_epoch_after_epoch_continues_each_epochs_batches_from_the_resume_point():
    lengths = sampler_lengths()
    sampler = LengthGroupedSampler(lengths, 4, 2, 1, seed=5)
    per_epoch = [list(LengthGroupedSampler(lengths, 4, 2, 1, seed=5, epoch=e)) for e in range(2, 5)]
    sampler.set_epoch(2, start_index=3)
    endless = iter(EpochAfterEpoch(sampler))
    taken = [next(endless) for _ in range(len(per_epoch[0]) - 3 + len(per_epoch[1]) + 2)]
    assert taken == per_epoch[0][3:] + per_epoch[1] + per_epoch[2][:2]


def _stage_positions(epoch: int, start: int, batches_per_rank: int, count: int) -> list[tuple[int, int]]:
    from types import SimpleNamespace

    from accelbench.train.stage import StageRunner

    sampler = LengthGroupedSampler([5] * (4 * batches_per_rank), 4, seed=0)
    stage = SimpleNamespace(_position=None)
    batches = StageRunner._batches(stage, EpochAfterEpoch(sampler), sampler, epoch, start)
    positions = []
    for _ in range(count):
        next(batches)
        positions.append(stage._position)
    return positions


def test_stage_positions_roll_over_at_the_epochs_end_so_resume_continues_after_the_last_batch():
    assert _stage_positions(0, 1, 3, 4) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    # a checkpoint written after an epoch's last batch (as older runs saved it) resumes in the next epoch
    assert _stage_positions(0, 3, 3, 2) == _stage_positions(1, 0, 3, 2) == [(1, 1), (1, 2)]


class _LoadLog(torch.utils.data.Dataset):
    """Appends each index to a file as a worker loads it."""

    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        with open(self.path, "a") as f:
            f.write(f"{index}\n")
        return index


def test_loader_workers_load_the_next_epochs_first_batch_before_it_is_asked_for(tmp_path: Path):
    import time

    log = tmp_path / "loaded.txt"
    log.touch()
    sampler = LengthGroupedSampler([5] * 8, 4, seed=0)  # two batches an epoch
    loader = torch.utils.data.DataLoader(_LoadLog(log, 8), batch_sampler=EpochAfterEpoch(sampler),
                                         num_workers=1, prefetch_factor=4, collate_fn=list)
    batches = iter(loader)
    epoch0 = [next(batches) for _ in range(sampler.batches_per_rank)]
    first_of_epoch1 = set(sampler.rank_batches(1)[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # the log has epoch 0's eight indices, then the next epoch's loads
        later = {int(line) for line in log.read_text().split()[8:]}
        if first_of_epoch1 <= later:
            break
        time.sleep(0.05)
    assert first_of_epoch1 <= later, "the workers did not load into the next epoch"
    assert sorted(i for b in epoch0 for i in b) == list(range(8))
    assert next(batches) == sampler.rank_batches(1)[0]


def test_balanced_ranks_train_the_same_samples_each_step_with_closer_token_counts():
    lengths, world = sampler_lengths(), 4
    sizes = [abs(n) for n in lengths]

    def steps(balance: bool) -> list[list[list[int]]]:  # [step][rank] -> batch
        per_rank = [list(LengthGroupedSampler(lengths, 4, world, r, seed=2, balance_ranks=balance))
                    for r in range(world)]
        return [list(batches) for batches in zip(*per_rank)]

    llava, dealt = steps(False), steps(True)
    assert len(llava) == len(dealt)
    spread = {True: [], False: []}
    for ordered, balanced in zip(llava, dealt):
        assert sorted(i for b in balanced for i in b) == sorted(i for b in ordered for i in b)  # same samples
        assert all(len(b) == 4 for b in balanced)
        for key, step in ((False, ordered), (True, balanced)):
            totals = [sum(sizes[i] for i in b) for b in step]
            spread[key].append(max(totals) / (sum(totals) / world))
    assert all(d <= o + 1e-9 for d, o in zip(spread[True], spread[False]))  # never worse than LLaVA's deal
    assert max(spread[True]) < max(spread[False])  # and better where LLaVA's is worst (its mixed megabatch)
    # one process per rank: each computes the same deal, and resumes into it
    resumed = LengthGroupedSampler(lengths, 4, world, 1, seed=2, balance_ranks=True)
    resumed.set_epoch(0, start_index=2)
    assert list(resumed) == [step[1] for step in dealt][2:]


def test_deal_by_length_fills_equal_parts_longest_first():
    sizes = [9, 1, 8, 2, 7, 3]
    assert deal_by_length(list(range(6)), sizes, 2) == [[0, 5, 3], [2, 4, 1]]  # totals 14 and 16
    with pytest.raises(ValueError, match="equal parts"):
        deal_by_length([0, 1, 2], sizes, 2)


# --------------------------------------------------------------------------- load_records


def test_load_records_reports_json_position(tmp_path: Path):
    bad = tmp_path / "d.json"
    bad.write_text('[\n {"id": 1,\n  "conversations": [}\n]')
    with pytest.raises(DataError, match=r"d\.json.*line 3 column"):
        load_records(bad)


@pytest.mark.parametrize("content, pattern", [('{"a": 1}', "top level"), ('[{"id": 1}, 5]', "record 1")])
def test_load_records_rejects_wrong_shapes(tmp_path: Path, content: str, pattern: str):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_records(path)


def test_load_records_jsonl(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1, "conversations": []}\n\n{"id": 2, "conversations": []}\n')
    assert [r["id"] for r in load_records(path)] == [1, 2]
    path.write_text('{"id": 1}\n[1]\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(path)
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "missing.json")


# --------------------------------------------------------------------------- validate_records


def good(i: int) -> dict:
    return {"id": f"g{i}", "image": "a.png", "conversations": conv("<image>\nWhat?", "Red.")}


def test_validate_counts_each_reason(tok, folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = [
        {"id": "m", "image": "nope.png", "conversations": conv("<image>\nq", "a")},
        {"id": "c", "image": "broken.png", "conversations": conv("<image>\nq", "a")},
        {"id": "n1", "image": "a.png", "conversations": []},
        {"id": "n2", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "n3", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
        {"id": "i1", "image": "a.png", "conversations": conv("no placeholder", "a")},
        {"id": "i2", "conversations": conv("<image>\nq", "a")},
        {"id": "i3", "image": "a.png", "conversations": conv("<image><image>\nq", "a")},
        {"id": "l", "conversations": conv("word " * 300, "a")},
    ]
    records = [good(i) for i in range(5)] + bad + [{"id": "t", "conversations": conv("q", "a")}]
    kept, report = validate_records(records, folder, tokenizer=tok, model_max_length=200, max_bad_fraction=1.0)
    assert [r["id"] for r in kept] == [f"g{i}" for i in range(5)] + ["t"]
    assert report.counts == {"missing_image": 1, "corrupt_image": 1, "no_conversations": 3,
                             "image_token_mismatch": 3, "too_long": 1}
    d = report.to_dict()
    assert d["examples"]["no_conversations"] == ["n1", "n2", "n3"] and d["total"] == 15 and d["bad"] == 9
    json.dumps(d)  # goes into result.json


def test_validate_examples_capped_and_fraction_limit(tok, folder):
    records = [good(i) for i in range(10)] + [{"id": f"x{i}", "conversations": []} for i in range(8)]
    _, report = validate_records(records, folder, tokenizer=tok, model_max_length=200, max_bad_fraction=0.5)
    assert report.counts == {"no_conversations": 8} and len(report.examples["no_conversations"]) == 5
    with pytest.raises(DataError, match=r"8 of 18 .*no_conversations.*--max-bad-fraction"):
        validate_records(records, folder, tokenizer=tok, model_max_length=200)


def test_validate_fail_policy_names_record(tok, folder):
    records = [good(0), {"id": "oops", "image": "gone.png", "conversations": conv("<image>\nq", "a")}]
    with pytest.raises(DataError, match="'oops'.*missing_image"):
        validate_records(records, folder, tokenizer=tok, model_max_length=200, policy="fail")


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../x.png", "/etc/passwd"])
def test_validate_path_escape_is_fatal(tok, folder, path):
    records = [good(0), {"id": "esc", "image": path, "conversations": conv("<image>\nq", "a")}]
    with pytest.raises(DataError, match="escapes the image folder") as info:
        validate_records(records, folder, tokenizer=tok, model_max_length=200, max_bad_fraction=1.0)
    assert path in str(info.value) and isinstance(info.value, AccelbenchError)


def test_validate_without_image_checks_and_empty(tok, folder):
    records = [good(0), {"id": "m", "image": "nope.png", "conversations": conv("<image>\nq", "a")}]
    kept, report = validate_records(records, folder, tokenizer=tok, model_max_length=200, check_images=False)
    assert len(kept) == 2 and report.bad == 0
    with pytest.raises(DataError, match="no usable records"):
        validate_records([], folder, tokenizer=tok, model_max_length=200)
    assert BadRecords().to_dict()["fraction"] == 0.0


def test_validate_plain_template_counts_caption_only(tok, folder):
    rec = {"id": "p", "image": "a.png", "conversations": conv("<image>\n" + "long prompt " * 200, "A cap.")}
    kept, _ = validate_records([rec], folder, tokenizer=tok, model_max_length=20, template="plain")
    assert kept == [rec]

"""MMMU prompt building, evaluate() end to end on a tiny random LLaVA, resume, and rank merging."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from accelbench.cases import PRESETS
from accelbench.eval.mmmu import (
    IMAGE_INPUTS, MMMUQuestion, build_prompt, evaluate, expand2square, load_mmmu, merge_results,
    partial_path_for, user_turn,
)
from accelbench.eval.mmmu_synth import write_synthetic_mmmu

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
IMAGE_SIZE = PRESETS["tiny"].vision.image_size


def _question(qid: str = "validation_Art_1", qtype: str = "multiple-choice", options=("x", "y"), **kw) -> MMMUQuestion:
    base = dict(id=qid, subject=qid.split("_")[1], question="What is in <image 1>?", options=list(options),
                question_type=qtype, answer="A", image=Image.new("RGB", (30, 20)), raw_options=repr(list(options)))
    base.update(kw)
    return MMMUQuestion(**base)


def test_prompts() -> None:
    mc = _question()
    assert user_turn(mc) == ("What is in <image 1>?\n(A) x\n(B) y\n"
                             "Answer with the option's letter from the given choices directly.")
    assert build_prompt(mc) == f"{SYSTEM} USER: <image>\n{user_turn(mc)} ASSISTANT:"
    op = _question(qtype="open", options=())
    assert build_prompt(op) == (f"{SYSTEM} USER: <image>\nWhat is in <image 1>?\n"
                                "Answer the question using a single word or phrase. ASSISTANT:")


def test_expand2square_pads_with_clip_mean() -> None:
    sq = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((20, 20)) == (255, 0, 0)


# ----------------------------------------------------------------------------- tiny model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = [f"w{i}" for i in range(PRESETS["tiny"].llm.vocab - len(specials))]  # fill the model's vocab
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def _image_processor(img: Image.Image) -> torch.Tensor:
    raw = expand2square(img).resize((IMAGE_SIZE, IMAGE_SIZE)).tobytes()
    hwc = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
    return hwc.permute(2, 0, 1).float() / 255.0 - 0.5


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlavaForConditionalGeneration

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].llava_config(image_token_id=tok.convert_tokens_to_ids("<image>"),
                                       pad_token_id=tok.pad_token_id)
    return LlavaForConditionalGeneration._from_config(cfg).eval(), tok


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> list[MMMUQuestion]:
    root = write_synthetic_mmmu(tmp_path_factory.mktemp("mmmu"), subjects=["Art", "Biology", "Pharmacy"],
                                per_subject=4)
    return load_mmmu(root)[0]


class _Spy:
    """Records every generate() call's input ids, delegating to the real model."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kw):
        self.calls.append(kw)
        return self.model.generate(**kw)


def test_evaluate_end_to_end(tiny, questions, tmp_path: Path) -> None:
    model, tok = tiny
    spy = _Spy(model)
    ticks: list[tuple[int, int]] = []
    out = tmp_path / "mmmu.json"
    rep = evaluate(spy, tok, _image_processor, questions, out_path=out, batch_size=5, max_new_tokens=4,
                   progress=lambda d, t: ticks.append((d, t)), skipped={"missing_image": ["validation_X_1"]})

    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert rep["image_inputs"] == IMAGE_INPUTS == "image_1 only (LLaVA-1.5 style)"
    assert rep["generation"] == {"mode": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": 4}
    assert rep["overall"]["total"] == len(questions) == 12
    assert set(rep["per_subject"]) == {"Art", "Biology", "Pharmacy"}
    assert set(rep["per_discipline"]) == {"Art and Design", "Science", "Health and Medicine"}
    assert rep["per_discipline"]["Science"]["total"] == 4
    assert sum(s["correct"] for s in rep["per_subject"].values()) == rep["overall"]["correct"]
    assert rep["skipped"] == {"missing_image": ["validation_X_1"]} and rep["skipped_count"] == 1
    assert rep["fallbacks"] == sum(q["fell_back"] for q in rep["questions"])
    assert [len(c["input_ids"]) for c in spy.calls] == [5, 5, 2]
    assert ticks[0] == (0, 12) and ticks[-1] == (12, 12)

    image_id = tok.convert_tokens_to_ids("<image>")
    for call in spy.calls:
        ids, mask = call["input_ids"], call["attention_mask"]
        assert ((ids == image_id).sum(dim=1) == model.config.image_seq_length).all()  # 16 per row
        assert (mask[:, -1] == 1).all()  # left padding: every row ends with real tokens
        assert call["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)

    keys = {"id", "subject", "question_type", "prompt", "response", "pred", "answer", "correct", "fell_back"}
    for q in rep["questions"]:
        assert keys <= set(q)
        assert q["prompt"].startswith(SYSTEM) and q["prompt"].endswith(" ASSISTANT:")
        assert isinstance(q["pred"], str if q["question_type"] == "multiple-choice" else list)
    assert [q["id"] for q in rep["questions"]] == [q.id for q in questions]  # subject, then natural id order
    assert len(partial_path_for(out).read_text().splitlines()) == 12
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic write left no temp file


def test_evaluate_resumes_from_partial(tiny, questions, tmp_path: Path) -> None:
    model, tok = tiny
    out = tmp_path / "mmmu.json"
    partial = tmp_path / "mmmu.partial.jsonl"
    assert partial_path_for(out) == partial
    settings = {"mode": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": 4}
    answered = questions[:5]
    lines = [json.dumps({"id": q.id, "subject": q.subject, "question_type": q.question_type, "prompt": "p",
                         "response": "(A)", "answer": q.answer, "options": q.options, "generation": settings})
             for q in answered]
    other = dict(json.loads(lines[0]), id=questions[5].id, generation={**settings, "mode": "flagperf"})
    partial.write_text("\n".join(lines + [json.dumps(other), '{"id": "torn'] ) + "\n")

    spy = _Spy(model)
    rep = evaluate(spy, tok, _image_processor, questions, out_path=out, batch_size=4, max_new_tokens=4)
    generated = sum(len(c["input_ids"]) for c in spy.calls)
    assert generated == len(questions) - len(answered)  # only the remaining ones (settings mismatch redone)
    by_id = {q["id"]: q for q in rep["questions"]}
    assert len(by_id) == len(questions)
    for q in answered:
        assert by_id[q.id]["response"] == "(A)"  # kept, not regenerated
        assert by_id[q.id]["pred"] == ("A" if q.question_type == "multiple-choice" else ["(a)"])

    spy.calls.clear()  # a second resume finds everything answered
    evaluate(spy, tok, _image_processor, questions, out_path=out, batch_size=4, max_new_tokens=4)
    assert spy.calls == []


def test_bad_images_are_skipped_not_fatal(tiny, questions, tmp_path: Path) -> None:
    model, tok = tiny
    qs = [questions[0], _question("validation_Art_98", image=None), _question("validation_Art_99"), questions[1]]

    def picky(img: Image.Image) -> torch.Tensor:
        if img.size == (30, 20):
            raise OSError("truncated")
        return _image_processor(img)

    rep = evaluate(model, tok, picky, qs, out_path=tmp_path / "mmmu.json", max_new_tokens=2)
    assert rep["skipped"] == {"missing_image": ["validation_Art_98"], "image_preprocess_error": ["validation_Art_99"]}
    assert rep["overall"]["total"] == 2


def test_flagperf_generation_and_ranks(tiny, questions, tmp_path: Path) -> None:
    model, tok = tiny
    qs = questions[:3]
    rep = evaluate(model, tok, _image_processor, qs, out_path=tmp_path / "r1.json", generation="flagperf",
                   max_new_tokens=2, rank=1, world_size=2)
    assert rep["generation"] == {"mode": "flagperf", "do_sample": True, "temperature": 1.0, "num_beams": 5,
                                 "max_new_tokens": 2}
    assert [q["id"] for q in rep["questions"]] == [qs[1].id]  # rank 1 of 2 takes every 2nd question
    with pytest.raises(ValueError, match="generation"):
        evaluate(model, tok, _image_processor, qs, out_path=tmp_path / "x.json", generation="beam")


def _records(n: int) -> list[dict]:
    subjects = ["Art", "Math", "Physics"]
    return [{"id": f"validation_{subjects[i % 3]}_{i}", "subject": subjects[i % 3], "question_type": "multiple-choice",
             "prompt": "p", "response": "no idea" if i % 2 else "(B)", "answer": "B", "options": ["a", "b", "c", "d"]}
            for i in range(n)]


def test_merge_results_equals_single_run() -> None:
    from accelbench.eval.mmmu import _report

    gen = {"mode": "greedy"}
    recs = _records(12)
    single = _report(recs, gen, {})
    parts = [_report(recs[r::3], gen, {"missing_image": [f"m{r}"]}, rank=r, world_size=3) for r in range(3)]
    merged = merge_results(parts)
    assert merged["questions"] == single["questions"]  # same Random(42) draws as a one-rank run
    assert merged["overall"] == single["overall"] and merged["fallbacks"] == 6
    assert merged["per_discipline"]["Science"]["total"] == 8
    assert merged["skipped"] == {"missing_image": ["m0", "m1", "m2"]}
    # Summing the parts' independent draws would not reproduce the single run's fallback letters.
    part_preds = {q["id"]: q["pred"] for p in parts for q in p["questions"]}
    assert part_preds != {q["id"]: q["pred"] for q in single["questions"]}
    with pytest.raises(ValueError, match="generation"):
        merge_results([parts[0], _report(recs, {"mode": "flagperf"}, {})])

"""MMMU evaluation of a LLaVA-1.5 model (HF ``LlavaForConditionalGeneration``), LLaVA-1.5 style.

Public API: :func:`load_mmmu`, :func:`build_prompt`, :func:`user_turn`, :func:`evaluate`,
:func:`merge_results`, :func:`score_response`, :func:`parse_options`, :class:`MMMUDataError`.
Only ``image_1`` is fed to the model (as LLaVA-1.5's own MMMU eval does); the report says so.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from accelbench.atomic import write_json_atomic
from accelbench.train.images import expand2square  # LLaVA's pad-to-square, one implementation
from accelbench.eval.mmmu_data import (
    DISCIPLINES, MULTIPLE_CHOICE, id_order, SUBJECT_TO_DISCIPLINE, SUBJECTS, MMMUDataError, MMMUQuestion,
    choice_letters, decode_image, load_mmmu, parse_answer, parse_options,
)
from accelbench.eval.mmmu_scoring import (
    FALLBACK_SEED, Score, parse_multi_choice_response, parse_open_response, score_response,
)

__all__ = [
    "DISCIPLINES", "SUBJECTS", "SUBJECT_TO_DISCIPLINE", "MMMUDataError", "MMMUQuestion", "Score",
    "IMAGE_INPUTS", "GENERATION_MODES", "build_prompt", "user_turn", "evaluate", "merge_results",
    "load_mmmu", "parse_options", "parse_answer", "decode_image", "score_response", "score_records",
    "summarize", "expand2square", "llava_image_processor", "partial_path_for",
    "parse_multi_choice_response", "parse_open_response", "choice_letters",
]

IMAGE_INPUTS = "image_1 only (LLaVA-1.5 style)"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
IMAGE_PLACEHOLDER = "<image>"

# FlagPerf's LLaVA-1.5 MMMU settings are sampled beam search, so its scores vary run to run.
GENERATION_MODES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "flagperf": {"do_sample": True, "temperature": 1.0, "num_beams": 5},
}

ImageProcessor = Callable[[Any], Any]  # PIL.Image -> torch.Tensor [3, H, W]


# ----------------------------------------------------------------------------- prompt


def user_turn(question: MMMUQuestion) -> str:
    """The user's text (without the image placeholder): question, options, instruction."""
    if question.question_type == MULTIPLE_CHOICE:
        lines = [question.question]
        lines += [f"({letter}) {text}" for letter, text in zip(choice_letters(len(question.options)), question.options)]
        lines.append(MC_INSTRUCTION)
        return "\n".join(lines)
    return f"{question.question}\n{OPEN_INSTRUCTION}"


def build_prompt(question: MMMUQuestion) -> str:
    """Full vicuna_v1 prompt with the ``<image>`` placeholder before the user text."""
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{user_turn(question)} ASSISTANT:"


# ----------------------------------------------------------------------------- image preprocessing


def llava_image_processor(hf_processor: Any) -> ImageProcessor:
    """Wrap an HF CLIP image processor into LLaVA-1.5's pad-to-square-then-CLIP callable."""
    def process(image: Any) -> Any:
        return hf_processor(expand2square(image.convert("RGB")), return_tensors="pt")["pixel_values"][0]
    return process


# ----------------------------------------------------------------------------- scoring and report


def _order_key(rec: dict[str, Any]) -> tuple[str, int, str]:
    """Subject, then the id's numeric suffix: the order the official run draws fallbacks in."""
    n, qid = id_order(rec["id"])
    return rec["subject"], n, qid


def score_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score raw-response records with one ``Random(42)`` consumed in subject order."""
    rng = random.Random(FALLBACK_SEED)
    out = []
    for rec in sorted(records, key=_order_key):
        letters, index2ans = parse_options(rec.get("options") or [])
        s = score_response(rec["question_type"], rec["response"], rec["answer"],
                           all_choices=letters, index2ans=index2ans, rng=rng)
        out.append({**rec, "pred": s.pred, "correct": s.correct, "fell_back": s.fell_back})
    return out


def _acc(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def summarize(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-subject, per-discipline (question-weighted) and overall accuracy with counts."""
    by_subject: dict[str, list[int]] = {}
    for rec in scored:
        c_t = by_subject.setdefault(rec["subject"], [0, 0])
        c_t[0] += int(rec["correct"])
        c_t[1] += 1
    by_disc: dict[str, list[int]] = {}
    for subj, (c, t) in by_subject.items():
        d = by_disc.setdefault(SUBJECT_TO_DISCIPLINE.get(subj, "Other"), [0, 0])
        d[0] += c
        d[1] += t
    return {
        "overall": _acc(sum(int(r["correct"]) for r in scored), len(scored)),
        "per_discipline": {d: _acc(*by_disc[d]) for d in sorted(by_disc)},
        "per_subject": {s: _acc(*by_subject[s]) for s in sorted(by_subject)},
        "fallbacks": sum(int(r["fell_back"]) for r in scored),
    }


def _merge_skipped(*parts: dict[str, list[str]] | None) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for part in parts:
        for reason, ids in (part or {}).items():
            bucket = merged.setdefault(reason, [])
            bucket.extend(i for i in ids if i not in bucket)
    return merged


def _report(records: list[dict[str, Any]], generation: dict[str, Any], skipped: dict[str, list[str]],
            **extra: Any) -> dict[str, Any]:
    scored = score_records(records)
    return {
        "benchmark": "MMMU",
        "image_inputs": IMAGE_INPUTS,
        "generation": generation,
        **summarize(scored),
        "skipped": skipped,
        "skipped_count": sum(len(v) for v in skipped.values()),
        **extra,
        "questions": scored,
    }


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-rank :func:`evaluate` results into one report, re-scored as a single run.

    Re-scoring (not summing) keeps the ``Random(42)`` fallback draws identical to a one-rank run.
    """
    if not parts:
        raise ValueError("merge_results needs at least one part")
    generation = parts[0]["generation"]
    for p in parts[1:]:
        if p["generation"] != generation:
            raise ValueError(f"cannot merge results with different generation settings: {generation} vs {p['generation']}")
    records: dict[str, dict[str, Any]] = {}
    for p in parts:
        for rec in p["questions"]:
            records[rec["id"]] = {k: v for k, v in rec.items() if k not in ("pred", "correct", "fell_back")}
    skipped = _merge_skipped(*(p.get("skipped") for p in parts))
    return _report(list(records.values()), generation, skipped, rank=None, world_size=len(parts))


# ----------------------------------------------------------------------------- generation


def partial_path_for(out_path: str | Path) -> Path:
    """``mmmu.json`` -> ``mmmu.partial.jsonl`` beside it (``x.json`` -> ``x.partial.jsonl``)."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.partial.jsonl")


def _read_partial(path: Path, generation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Answered records from a previous run with the same settings; a torn last line is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # interrupted mid-write
        if isinstance(rec, dict) and "id" in rec and "response" in rec and rec.get("generation") == generation:
            done[rec["id"]] = rec
    return done


def _encode(tokenizer: Any, prompt: str, image_token_id: int, n_image_tokens: int) -> list[int]:
    """Token ids with ``<image>`` expanded to ``n_image_tokens`` image ids (LLaVA's tokenizer_image_token)."""
    before, after = prompt.split(IMAGE_PLACEHOLDER, 1)
    head = tokenizer(before, add_special_tokens=True)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    return list(head) + [image_token_id] * n_image_tokens + list(tail)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _image_token_id(model: Any) -> int:
    cfg = model.config
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        raise ValueError("model.config has no image_token_id; is this a LlavaForConditionalGeneration?")
    return int(tid)


def _generate_batch(model: Any, tokenizer: Any, prompts: list[str], pixels: list[Any],
                    gen_kwargs: dict[str, Any], max_new_tokens: int) -> list[str]:
    import torch

    image_id = _image_token_id(model)
    n_img = int(model.config.image_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad([_encode(tokenizer, p, image_id, n_img) for p in prompts], pad_id or 0)
    param = next(model.parameters())
    pixel_values = torch.stack(pixels).to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(param.device), attention_mask=mask.to(param.device), pixel_values=pixel_values,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            suppress_tokens=[image_id],  # a generated image id would break the next forward's token count
            **gen_kwargs,
        )
    new = out[:, ids.shape[1]:]  # decoder-only generate returns prompt + continuation
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _prepare(questions: list[MMMUQuestion], image_processor: ImageProcessor,
             skipped: dict[str, list[str]]) -> list[tuple[MMMUQuestion, Any]]:
    """Preprocess images up front per question; failures become counted skips, not crashes."""
    ready = []
    for q in questions:
        if q.image is None:
            skipped.setdefault("missing_image", []).append(q.id)
            continue
        try:
            ready.append((q, image_processor(q.image)))
        except Exception:  # any processor failure on one image must not end the run
            skipped.setdefault("image_preprocess_error", []).append(q.id)
    return ready


def evaluate(
    model: Any, tokenizer: Any, image_processor: ImageProcessor, questions: list[MMMUQuestion], *,
    out_path: str | Path, generation: str = "greedy", batch_size: int = 8, max_new_tokens: int = 128,
    progress: Callable[[int, int], None] | None = None, rank: int = 0, world_size: int = 1,
    skipped: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Generate answers for this rank's share (every ``world_size``-th question), score, write ``out_path``.

    Answers are appended to ``<stem>.partial.jsonl`` beside ``out_path`` after every batch; a rerun skips
    ids already there (generated with the same settings). ``skipped`` (from :func:`load_mmmu`) is carried
    into the report. ``progress(done, total)`` is called after each batch. Returns the report dict.
    """
    if generation not in GENERATION_MODES:
        raise ValueError(f"unknown generation {generation!r}; choose one of {sorted(GENERATION_MODES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    gen_kwargs = GENERATION_MODES[generation]
    settings = {"mode": generation, **gen_kwargs, "max_new_tokens": max_new_tokens}
    out_path = Path(out_path)
    partial = partial_path_for(out_path)
    partial.parent.mkdir(parents=True, exist_ok=True)

    mine = questions[rank::world_size]
    done = {k: v for k, v in _read_partial(partial, settings).items() if k in {q.id for q in mine}}
    run_skipped = _merge_skipped(skipped)
    todo = _prepare([q for q in mine if q.id not in done], image_processor, run_skipped)
    total = len(done) + len(todo)
    if progress:
        progress(len(done), total)
    model.eval()
    with partial.open("a", encoding="utf-8") as log:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [build_prompt(q) for q, _ in batch]
            responses = _generate_batch(model, tokenizer, prompts, [px for _, px in batch], gen_kwargs, max_new_tokens)
            for (q, _), prompt, resp in zip(batch, prompts, responses):
                rec = {"id": q.id, "subject": q.subject, "question_type": q.question_type, "prompt": prompt,
                       "response": resp, "answer": q.answer, "options": q.options, "generation": settings}
                log.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[q.id] = rec
            log.flush()
            os.fsync(log.fileno())
            if progress:
                progress(len(done), total)
    records = [{k: v for k, v in r.items() if k != "generation"} for r in done.values()]
    report = _report(records, settings, run_skipped, rank=rank, world_size=world_size)
    write_json_atomic(out_path, report)
    return report

"""LLaVA-1.5 training data: records, conversation templates, label masking, dataset, batching.

Record format (LLaVA's ``blip_laion_cc_sbu_558k.json`` / ``llava_v1_5_mix665k.json``)::

    {"id": ..., "image": "rel/path.jpg"?, "conversations": [{"from": "human"|"gpt", "value": ...}]}

A record is turned into a list of *pieces* (bos, text, image placeholder, eos), each marked
trained or not; pieces are tokenized one by one with ``add_special_tokens=False`` so the
label mask is exact at every boundary, unlike LLaVA's length arithmetic on the whole prompt.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from accelbench.errors import DataError
from accelbench.train.images import load_image, make_image_transform, safe_image_path, verify_image

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
Template = Literal["plain", "vicuna_v1"]
TEMPLATE_ASPECT: dict[str, Literal["crop", "pad"]] = {"plain": "crop", "vicuna_v1": "pad"}
BAD_REASONS = ("missing_image", "corrupt_image", "no_conversations", "image_token_mismatch", "too_long")
EXAMPLES_PER_REASON = 5


# --------------------------------------------------------------------------- loading


def load_records(json_path: str | os.PathLike[str]) -> list[dict]:
    """Read a LLaVA ``.json`` (a list of objects) or ``.jsonl`` (one object per line)."""
    path = Path(json_path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 (byte {exc.start}): {exc.reason}") from exc
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(text, path)
    data = _parse_json(text, f"data file {str(path)!r}")
    if not isinstance(data, list):
        raise DataError(f"data file {str(path)!r}: top level is a {type(data).__name__}, "
                        "expected a JSON list of records (LLaVA format)")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"data file {str(path)!r}: record {index} is a {type(record).__name__}, "
                            "expected an object with 'id' and 'conversations'")
    return data


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:  # pathological nesting ("[[[[...")
        raise DataError(f"{where} is nested too deeply to parse") from exc
    except ValueError as exc:  # e.g. integers past Python's digit limit
        raise DataError(f"{where} cannot be parsed: {exc}") from exc


def _parse_jsonl(text: str, path: Path) -> list[dict]:
    records: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_json(line, f"data file {str(path)!r} line {lineno}")
        if not isinstance(record, dict):
            raise DataError(f"data file {str(path)!r} line {lineno}: a {type(record).__name__}, "
                            "expected a JSON object record")
        records.append(record)
    return records


# --------------------------------------------------------------------------- templates


class Piece(NamedTuple):
    """One tokenization unit. ``kind`` is "bos", "eos", "image" or "text"."""
    kind: str
    text: str = ""
    train: bool = False


def record_id(record: dict, index: int | None = None) -> str:
    value = record.get("id")
    if value is None:
        return f"#{index}" if index is not None else "<no id>"
    return str(value)


def _move_image_to_front(value: str) -> str:
    """LLaVA preprocess_multimodal: the image goes first, then a newline, then the text."""
    if IMAGE_PLACEHOLDER not in value:
        return value
    return IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()


def _text_with_image(text: str, train: bool) -> list[Piece]:
    """Split ``text`` at ``<image>`` (like LLaVA's tokenizer_image_token) into pieces."""
    pieces: list[Piece] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            pieces.append(Piece("image"))
        if chunk:
            pieces.append(Piece("text", chunk, train))
    return pieces


def build_pieces(record: dict, template: Template) -> list[Piece]:
    """The record as template pieces; assumes ``conversation_problem(record) is None``."""
    turns = record["conversations"]
    has_image = record.get("image") is not None
    if template == "plain":
        # LLaVA preprocess_plain: the prompt is just the image; caption + "\n" is trained.
        pieces = [Piece("bos")]
        if has_image:
            pieces.append(Piece("image"))
        pieces.append(Piece("text", turns[1]["value"] + "\n", True))
        return pieces
    if template != "vicuna_v1":
        raise ValueError(f"unknown template {template!r}: use 'plain' or 'vicuna_v1'")
    # conv_vicuna_v1: system + " " + "USER: " + q + " " + "ASSISTANT: " + a + "</s>" + "USER: " ...
    # The space after "ASSISTANT:" is left to the tokenizer's prefix space (SentencePiece /
    # Metaspace style) so the answer pieces tokenize exactly as the answer text alone.
    pieces = [Piece("bos")]
    prefix = VICUNA_SYSTEM + " "
    for human, gpt in zip(turns[0::2], turns[1::2]):
        question = _move_image_to_front(human["value"]) if has_image else human["value"]
        pieces += _text_with_image(prefix + "USER: " + question + " ASSISTANT:", False)
        if gpt["value"]:
            pieces.append(Piece("text", gpt["value"], True))
        pieces.append(Piece("eos", train=True))
        prefix = ""
    return pieces


def _is_utf8(text: str) -> bool:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def conversation_problem(record: dict, template: Template) -> tuple[str, str] | None:
    """Structural check of one record: None when usable, else (reason, detail)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no_conversations", "'conversations' is missing or empty"
    if len(turns) % 2:
        return "no_conversations", f"{len(turns)} turns: expected human/gpt pairs"
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            return "no_conversations", f"turn {i} is not from {want!r} (turns must alternate human, gpt)"
        if not isinstance(turn.get("value"), str):
            return "no_conversations", f"turn {i} 'value' is not a string"
        if not _is_utf8(turn["value"]):
            return "no_conversations", f"turn {i} 'value' is not valid Unicode text (lone surrogate)"
    image = record.get("image")
    human_count = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[0::2])
    gpt_count = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[1::2])
    if gpt_count:
        return "image_token_mismatch", "an answer contains '<image>'"
    if image is not None and human_count != 1:
        return "image_token_mismatch", f"has an image but {human_count} '<image>' placeholders"
    if image is None and human_count:
        return "image_token_mismatch", "has '<image>' but no 'image' field"
    if template == "plain" and not turns[1]["value"]:
        return "no_conversations", "empty caption"
    return None


# --------------------------------------------------------------------------- tokenization


def special_ids(tokenizer: Any) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DataError("the tokenizer has no bos/eos token: LLaVA-1.5 templates need both (<s>, </s>)")
    return bos, eos


def _tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_pieces(pieces: Sequence[Piece], tokenizer: Any, *, image_tokens: int,
                  image_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not trained), with the image placeholder expanded."""
    bos, eos = special_ids(tokenizer)
    text_ids = iter(_tokenize_texts(tokenizer, [p.text for p in pieces if p.kind == "text"]))
    ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        if piece.kind == "text":
            chunk = list(next(text_ids))
        elif piece.kind == "image":
            chunk = [image_token_id] * image_tokens
        else:
            chunk = [bos if piece.kind == "bos" else eos]
        ids += chunk
        labels += chunk if piece.train else [IGNORE_INDEX] * len(chunk)
    return ids, labels


def text_token_counts(piece_lists: Sequence[Sequence[Piece]], tokenizer: Any,
                      chunk: int = 4096) -> list[int]:
    """Tokens per record excluding image tokens, tokenizing all records' texts in batches."""
    owners: list[int] = []
    texts: list[str] = []
    counts = [0] * len(piece_lists)
    for index, pieces in enumerate(piece_lists):
        for piece in pieces:
            if piece.kind == "text":
                owners.append(index)
                texts.append(piece.text)
            elif piece.kind in ("bos", "eos"):
                counts[index] += 1
    for start in range(0, len(texts), chunk):
        for owner, ids in zip(owners[start:start + chunk], _tokenize_texts(tokenizer, texts[start:start + chunk])):
            counts[owner] += len(ids)
    return counts


# --------------------------------------------------------------------------- validation


@dataclass
class BadRecords:
    """Skipped records, counted by reason, with the first few ids of each for the report."""
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # first detail per reason

    def add(self, reason: str, rid: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLES_PER_REASON:
            ids.append(rid)
        self.details.setdefault(reason, detail)

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        return ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                         for reason, n in sorted(self.counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "bad": self.bad, "fraction": self.fraction,
                "counts": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}


def _image_problem(image_folder: str | os.PathLike[str], rel_path: str) -> tuple[str, str] | None:
    path = safe_image_path(image_folder, rel_path)  # escapes raise: they are never "skippable"
    if not os.path.isfile(path):  # unlike Path.is_file, never raises (e.g. name too long)
        return "missing_image", f"{str(path)!r} does not exist"
    reason = verify_image(path)
    return ("corrupt_image", f"{str(path)!r}: {reason}") if reason else None


def validate_records(records: Sequence[dict], image_folder: str | os.PathLike[str], *, tokenizer: Any,
                     model_max_length: int, template: Template = "vicuna_v1",
                     policy: Literal["skip", "fail"] = "skip", max_bad_fraction: float = 0.01,
                     check_images: bool = True, workers: int = 8,
                     text_tokens: list[int] | None = None) -> tuple[list[dict], BadRecords]:
    """Drop (or fail on) unusable records; returns the kept records and what was dropped.

    ``template`` decides the text counted against ``model_max_length`` (image tokens are
    not counted: ``too_long`` means the text alone cannot fit).  ``text_tokens``, when given, is
    filled with each kept record's text token count (the planner sizes packed micro-batches by it).
    """
    if policy not in ("skip", "fail"):
        raise ValueError(f"policy must be 'skip' or 'fail', not {policy!r}")
    bad = BadRecords(total=len(records))
    problems: list[tuple[str, str] | None] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"record {index} is a {type(record).__name__}, expected an object")
        image = record.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            problems.append(("missing_image", f"'image' is {image!r}, not a relative path"))
            continue
        if image is not None:
            safe_image_path(image_folder, image)  # escapes are fatal, whatever else is wrong
        problems.append(conversation_problem(record, template))

    def fail_or_add(index: int, problem: tuple[str, str]) -> None:
        rid = record_id(records[index], index)
        if policy == "fail":
            raise DataError(f"record {rid!r} (index {index}) is bad: {problem[0]}: {problem[1]} "
                            "(use policy 'skip' to drop bad records)")
        bad.add(problem[0], rid, problem[1])

    # Text length first (cheap, batched), then images only for records still in the running.
    candidates = [i for i, p in enumerate(problems) if p is None]
    counts = text_token_counts([build_pieces(records[i], template) for i in candidates], tokenizer)
    count_of = dict(zip(candidates, counts))
    for index, count in count_of.items():
        if count > model_max_length:
            problems[index] = ("too_long", f"{count} text tokens > model_max_length {model_max_length}")
    if check_images:
        with_image = [i for i, p in enumerate(problems) if p is None and records[i].get("image") is not None]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # stat/verify are I/O bound
            found = pool.map(lambda i: _image_problem(image_folder, records[i]["image"]), with_image)
            for index, problem in zip(with_image, found):
                problems[index] = problem
    for index, problem in enumerate(problems):
        if problem is not None:
            fail_or_add(index, problem)

    kept = [r for r, p in zip(records, problems) if p is None]
    if text_tokens is not None:
        text_tokens[:] = [count_of[i] for i, p in enumerate(problems) if p is None]
    if bad.total and bad.fraction > max_bad_fraction:
        raise DataError(
            f"{bad.bad} of {bad.total} records ({bad.fraction:.1%}) are bad: {bad.summary()}; "
            f"this exceeds --max-bad-fraction {max_bad_fraction} (raise it to train on the rest, "
            "or fix the data)")
    if not kept:
        raise DataError(f"no usable records (of {bad.total}): {bad.summary() or 'the data file is empty'}")
    return kept, bad


# --------------------------------------------------------------------------- dataset


class LlavaDataset(Dataset):
    """Tokenized, masked LLaVA samples with CLIP-preprocessed images."""

    def __init__(self, records: Sequence[dict], image_folder: str | os.PathLike[str], tokenizer: Any, *,
                 template: Template, image_tokens: int, image_token_id: int, image_size: int,
                 model_max_length: int) -> None:
        if template not in TEMPLATE_ASPECT:
            raise ValueError(f"unknown template {template!r}: use 'plain' or 'vicuna_v1'")
        special_ids(tokenizer)
        self.records = list(records)
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.template = template
        self.image_tokens = image_tokens
        self.image_token_id = image_token_id
        self.model_max_length = model_max_length
        self.transform = make_image_transform(image_size, TEMPLATE_ASPECT[template])
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """ids/labels of one record, expanded and truncated (the tail is cut)."""
        problem = conversation_problem(record, self.template)
        if problem is not None:
            raise DataError(f"record {record_id(record)!r} is bad: {problem[0]}: {problem[1]} "
                            "(run validate_records first)")
        pieces = build_pieces(record, self.template)
        ids, labels = encode_pieces(pieces, self.tokenizer, image_tokens=self.image_tokens,
                                    image_token_id=self.image_token_id)
        if len(ids) > self.model_max_length:
            # The vision tower emits all image tokens: a cut inside the run cannot be trained.
            if any(p.kind == "image" for p in pieces) and \
                    ids[:self.model_max_length].count(self.image_token_id) < self.image_tokens:
                raise DataError(f"record {record_id(record)!r}: model_max_length {self.model_max_length} "
                                f"cuts into its {self.image_tokens} image tokens; raise --model-max-length")
            ids, labels = ids[:self.model_max_length], labels[:self.model_max_length]
        return ids, labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ids, labels = self.encode(record)
        image = record.get("image")
        pixels = self.transform(load_image(self.image_folder, image)) if image is not None else None
        return {"id": record_id(record, index), "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": pixels}

    @property
    def lengths(self) -> list[int]:
        """Estimated total length per record: word count (LLaVA's estimate) + image tokens.

        Words, not tokens, so that grouping 665k records costs no tokenization; the sampler
        only needs the ordering to be roughly right.
        """
        if self._lengths is None:
            self._lengths = [self._estimate(r) for r in self.records]
        return self._lengths

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's modality_lengths: positive for records with an image, negative without."""
        return [n if r.get("image") is not None else -n for n, r in zip(self.lengths, self.records)]

    def _estimate(self, record: dict) -> int:
        words = sum(len(t["value"].split()) for t in record["conversations"] if isinstance(t.get("value"), str))
        return max(1, words + (self.image_tokens if record.get("image") is not None else 0))


# --------------------------------------------------------------------------- batching


def host_positions(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """Where a batch's image tokens and targets sit, as indices into its flattened [B*T] positions, found on the
    host: the objective then places image features and picks target positions by index, where boolean masks on
    the device would make the host wait for the device to finish everything queued (``nonzero``), once in the
    forward and once in the backward of every micro-batch. ``target_index``: the positions whose next label (in
    the same row) is a target, i.e. whose logits the loss needs; that label sits at ``target_index + 1``."""
    following = torch.full_like(labels, IGNORE_INDEX)
    following[..., :-1] = labels[..., 1:]
    return {"image_index": (input_ids.reshape(-1) == image_token_id).nonzero().squeeze(1),
            "target_index": (following.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)}


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int, image_token_id: int | None = None) -> dict[str, Any]:
    """Right-pad a list of dataset samples into a batch; also count real vs padded tokens. With
    ``image_token_id``, also the batch's ``host_positions``."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    seq_lens = [int(s["input_ids"].numel()) for s in samples]
    width = max(seq_lens)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (sample, n) in enumerate(zip(samples, seq_lens)):
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "pixel_values": torch.stack(images) if images else None,
        "ids": [s["id"] for s in samples], "seq_lens": seq_lens,
        "real_tokens": sum(seq_lens), "padded_tokens": len(samples) * width,
        **(host_positions(input_ids, labels, image_token_id) if image_token_id is not None else {}),
    }


def _split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """LLaVA: deal a sorted megabatch into ``num_chunks`` chunks of similar total length."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = math.inf
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator) -> list[int]:
    """LLaVA get_length_grouped_indices: shuffle, cut megabatches, sort each by length."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    out: list[int] = []
    for start in range(0, len(indices), size):
        mega = sorted(indices[start:start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in _split_to_even_chunks(mega, lengths, world_size):
            out += chunk
    return out


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list[int]:
    """LLaVA get_modality_length_grouped_indices, but every shuffle uses ``generator``.

    (LLaVA passes generator=None to the per-modality shuffles, which breaks resume.)
    """
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (sign carries the modality)")
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    size = world_size * batch_size
    groups: list[list[list[int]]] = []
    for pairs in (mm, lang):
        order = length_grouped_indices([n for _, n in pairs], batch_size, world_size, generator)
        shuffled = [pairs[i][0] for i in order]
        groups.append([shuffled[i:i + size] for i in range(0, len(shuffled), size)])
    (mm_megas, lang_megas) = groups
    leftover = mm_megas[-1] + lang_megas[-1]  # the two ragged tails share one final megabatch
    megas = mm_megas[:-1] + lang_megas[:-1]
    megas = [megas[i] for i in torch.randperm(len(megas), generator=generator).tolist()]
    if leftover:
        megas.append(sorted(leftover))
    return [i for mega in megas for i in mega]


def deal_by_length(indices: list[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """``indices`` dealt into ``parts`` equal-sized lists of similar total length: LLaVA's split of a megabatch
    (``_split_to_even_chunks``: longest first, each to the list with the least total that still has room), on
    the indices sorted by length, ties by index. Deterministic, so every rank computes the same deal."""
    if len(indices) % parts:
        raise ValueError(f"{len(indices)} samples cannot be dealt into {parts} equal parts")
    return _split_to_even_chunks(sorted(indices, key=lambda i: (-lengths[i], i)), lengths, parts)


class LengthGroupedSampler(Sampler[list[int]]):
    """Batch sampler: this rank's batches of LLaVA's length-grouped order.

    The global order is cut into batches of ``batch_size``; batch k goes to rank
    ``k % world_size`` (as accelerate's BatchSamplerShard does), so each megabatch gives
    every rank one similar-length batch. The order is padded by wrapping around so all
    ranks get the same number of full batches. Deterministic in (seed, epoch); resume
    with ``set_epoch(epoch, start_index=batches_done_this_epoch)``.

    ``balance_ranks`` (lever "balanced-ranks"): the ``world_size`` batches that run side by side are dealt again
    by length (``deal_by_length``), so that the ranks' token counts are close in every step, the last (mixed)
    megabatch included, which LLaVA leaves in index order. A step trains on the same samples either way.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, group_by_modality: bool = True, *, epoch: int = 0,
                 start_index: int = 0, balance_ranks: bool = False) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: batch_size={batch_size} world_size={world_size} rank={rank}")
        if not lengths:
            raise ValueError("LengthGroupedSampler needs at least one record")
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_by_modality = seed, group_by_modality
        self.epoch, self.start_index = epoch, start_index
        self.balance_ranks = balance_ranks

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch, self.start_index = epoch, start_index

    @property
    def batches_per_rank(self) -> int:
        return math.ceil(len(self.lengths) / (self.batch_size * self.world_size))

    def global_order(self, epoch: int | None = None) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        if self.group_by_modality:
            order = modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)
        else:
            order = length_grouped_indices([abs(n) for n in self.lengths], self.batch_size,
                                           self.world_size, generator)
        total = self.batches_per_rank * self.batch_size * self.world_size
        while len(order) < total:  # wrap around, as DistributedSampler pads
            order += order[:total - len(order)]
        return order

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the sampler's), from the first."""
        order = self.global_order(epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.balance_ranks and self.world_size > 1:
            sizes = [abs(n) for n in self.lengths]
            steps = [[i for batch in batches[k:k + self.world_size] for i in batch]
                     for k in range(0, len(batches), self.world_size)]
            batches = [dealt for step in steps for dealt in deal_by_length(step, sizes, self.world_size)]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()[self.start_index:]

    def __len__(self) -> int:
        return max(0, self.batches_per_rank - self.start_index)


class EpochAfterEpoch:
    """``sampler``'s batches from its (epoch, start_index) on, epoch after epoch, without end.

    Given to a DataLoader as its batch sampler, this keeps one iteration going across epochs, so the workers load
    the next epoch's first batches while this epoch's last ones train. A new iteration per epoch starts with
    nothing loaded: on CPU, with the 13B case's synthetic data at LBS 16, its first batch waited 86 and 109 ms, against
    5 ms for the others and for an epoch's first batch this way (``benchmarks/epoch_boundary.py``)."""

    def __init__(self, sampler: LengthGroupedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.sampler.epoch, self.sampler.start_index
        while True:
            yield from self.sampler.rank_batches(epoch)[start:]
            epoch, start = epoch + 1, 0

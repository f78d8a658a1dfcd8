"""A LLaVA-format data folder whose every sample is exactly ``length`` tokens, one image each.

FINDINGS.md's peer measurement uses fixed 1024-token sequences with 576 image tokens: no padding, no
length grouping effects, so both paths do the same work per step.  The folder is accelbench's synthetic
set (same images, same tokenizer) with the two JSON files rewritten: every record (pretrain and finetune)
becomes one image + one question/answer turn whose text is padded with single-token words until the
template-encoded sample is exactly ``length`` tokens.  Both ``accelbench run --data DIR`` and
``hf_peer.py --data DIR`` read it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

MARKER = "fixed_len"


def _single_token_words(tokenizer: Any, limit: int = 400) -> list[str]:
    """Alphabetic vocabulary words that tokenize to exactly one token after a space (Metaspace)."""
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("▁") and t[1:].isalpha() and len(t) > 2})
    prefix = "Describe it"
    base = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    ok = []
    for w in words:
        if len(tokenizer(f"{prefix} {w}", add_special_tokens=False)["input_ids"]) == base + 1:
            ok.append(w)
        if len(ok) >= limit:
            break
    if not ok:
        raise RuntimeError("the tokenizer has no single-token words to pad with")
    return ok


def _encoded_len(record: dict, template: str, tokenizer: Any, image_tokens: int, image_token_id: int) -> int:
    from accelbench.train.data import build_pieces, encode_pieces

    ids, _ = encode_pieces(build_pieces(record, template), tokenizer, image_tokens=image_tokens,  # type: ignore[arg-type]
                           image_token_id=image_token_id)
    return len(ids)


def _fit_record(record: dict, template: str, length: int, words: list[str], rng: random.Random, tokenizer: Any,
                image_tokens: int, image_token_id: int) -> dict:
    answer: list[str] = [rng.choice(words)]
    for _ in range(50):
        record["conversations"][1]["value"] = " ".join(answer)
        n = _encoded_len(record, template, tokenizer, image_tokens, image_token_id)
        if n == length:
            return record
        if n < length:
            answer += [rng.choice(words) for _ in range(length - n)]
        else:
            del answer[max(1, len(answer) - (n - length)):]
            if len(answer) == 1 and n > length:
                break
    raise RuntimeError(f"could not fit record {record.get('id')!r} to exactly {length} tokens")


def make_fixed_len_data(out_dir: str | Path, *, case: str, length: int = 1024, seed: int = 0,
                        n_records: int = 256) -> Path:
    """Write (or reuse) the fixed-length folder for ``case``; returns it."""
    from transformers import AutoTokenizer

    from accelbench.cases import get_preset
    from accelbench.train.synth import synthesize

    preset = get_preset(case)
    image_tokens = preset.vision.image_tokens
    if length <= image_tokens + 16:
        raise ValueError(f"--fixed-len {length} leaves no room for text next to {image_tokens} image tokens")
    out = Path(out_dir)
    vocab = preset.llm.vocab if case == "tiny" else 1024  # as accelbench's prepare_data
    paths = synthesize(out, n_pretrain=n_records, n_finetune=n_records, image_size=preset.vision.image_size,
                       vocab_size=vocab, seed=seed, mmmu=False)
    manifest = json.loads(paths["manifest"].read_text())
    if manifest.get(MARKER) == {"length": length, "image_tokens": image_tokens}:
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    rng = random.Random(seed)
    words = _single_token_words(tokenizer)
    pretrain = json.loads(paths["pretrain_json"].read_text())
    images = [r["image"] for r in pretrain]
    for name, template in (("pretrain_json", "plain"), ("finetune_json", "vicuna_v1")):
        records = json.loads(paths[name].read_text())
        fixed = []
        for i, rec in enumerate(records):
            new = {"id": rec["id"], "image": rec.get("image") or images[i % len(images)], "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": ""}]}
            fixed.append(_fit_record(new, template, length, words, rng, tokenizer, image_tokens, image_token_id))
        tmp = paths[name].with_suffix(".tmp")
        tmp.write_text(json.dumps(fixed, indent=1) + "\n", encoding="utf-8")
        tmp.replace(paths[name])
    manifest[MARKER] = {"length": length, "image_tokens": image_tokens}
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="llava1.5-7b")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_fixed_len_data(a.out, case=a.case, length=a.length, seed=a.seed))

"""Validate the training data in the launcher, before any rank starts or any model loads.

Malformed files, paths that leave the image folder, ``--bad-samples fail`` and too many bad records
stop the run here with one clear line. The result, kept record indices included, goes to
``STAGE/data_check.json``; every rank reads it instead of validating again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

DATA_CHECK = "data_check.json"


def stage_json(cfg: Any, stage: str) -> str:
    return cfg.data.pretrain_json if stage == "pretrain" else cfg.data.finetune_json


def check_data(cfg: Any) -> dict[str, dict[str, Any]]:
    """{stage: {"json", "records", "used", "bad_records", "template", "max_micro_batch_tokens"}} for
    ``cfg``'s stages."""
    from ..atomic import write_json_atomic
    from ..cases import get_preset
    from .data import load_records, validate_records

    tokenizer = _tokenizer(cfg.data.tokenizer)  # the tokenizer only: too_long counts text tokens
    image_tokens = get_preset(cfg.case).vision.image_tokens
    out: dict[str, dict[str, Any]] = {}
    for stage in cfg.stages:
        json_path = stage_json(cfg, stage)
        template = "plain" if stage == "pretrain" else "vicuna_v1"
        records = load_records(json_path)  # malformed file: DataError naming the file and line/record
        plan, text_tokens = cfg.plans[stage], []
        try:
            good, bad = validate_records(records, cfg.data.image_folder, tokenizer=tokenizer,
                                         model_max_length=plan["MPE"], template=template,
                                         policy=cfg.bad_samples, max_bad_fraction=cfg.max_bad_fraction,
                                         text_tokens=text_tokens)
        except DataError as exc:
            text = str(exc).replace("(use policy 'skip' to drop bad records)",
                                    "(--bad-samples fail is set; --bad-samples skip drops bad records)")
            raise DataError(f"{stage} data {json_path!r}: {text}") from None
        kept_ids = {id(r) for r in good}
        lengths = [min(plan["MPE"], n + (image_tokens if r.get("image") is not None else 0))
                   for n, r in zip(text_tokens, good)]
        info = {"json": json_path, "records": len(records), "used": len(good), "bad_records": bad.to_dict(),
                "template": template, "max_micro_batch_tokens": micro_batch_token_bound(lengths, plan["LBS"])}
        write_json_atomic(Path(cfg.run_dir) / stage / DATA_CHECK,
                          info | {"kept": [i for i, r in enumerate(records) if id(r) in kept_ids]})
        out[stage] = info
    return out


def micro_batch_token_bound(lengths: list[int], micro_batch: int) -> int:
    """Most tokens any micro-batch of ``micro_batch`` samples can hold: its longest samples together.

    A packed micro-batch is exactly its samples' tokens, so this bounds every one the sampler can
    draw, in any epoch and order (a padded one is bounded by micro_batch × the longest instead).
    """
    return sum(sorted(lengths, reverse=True)[:micro_batch])


def read_data_check(stage_dir: str | Path, json_path: str, n_records: int) -> dict[str, Any] | None:
    """The launcher's check for this stage, if it is for this very file and record count."""
    try:
        checked = json.loads((Path(stage_dir) / DATA_CHECK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if checked.get("json") != json_path or checked.get("records") != n_records:
        return None
    return checked


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a missing or broken tokenizer folder is a data error, not a traceback
        raise DataError(f"tokenizer {path!r} cannot be loaded: {str(exc).splitlines()[0] if str(exc) else exc}; "
                        f"the data folder needs tokenizer/ (see `accelbench data synth`)") from None

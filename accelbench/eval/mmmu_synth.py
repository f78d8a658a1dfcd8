"""Synthetic MMMU in the hub's on-disk layout, for tests and offline smoke runs.

Same schema as MMMU/MMMU (``<Subject>/<split>-00000-of-00001.parquet``, image structs with real PNG
bytes, ``options`` as a Python list literal string), so :func:`load_mmmu` reads it through the same
code path as the real data.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# One subject per discipline so discipline aggregation is exercised.
DEFAULT_SUBJECTS = ["Art", "Accounting", "Biology", "Clinical_Medicine", "History", "Computer_Science"]
MAX_IMAGES = 7
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    + [(f"image_{i}", IMAGE_STRUCT) for i in range(1, MAX_IMAGES + 1)]
    + [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
       ("question_type", pa.string()), ("subfield", pa.string())]
)
_WORDS = ["red", "blue", "circle", "square", "ratio", "cell", "budget", "empire", "graph", "vector", "enzyme"]


def png_bytes(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A small non-square PNG with a coloured shape (non-square exercises pad-to-square)."""
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _row(rng: random.Random, split: str, subject: str, index: int) -> dict[str, Any]:
    qid = f"{split}_{subject}_{index}"
    is_open = index % 4 == 0  # every 4th question is open, as a minority like in MMMU
    words = " ".join(rng.choice(_WORDS) for _ in range(3))
    row: dict[str, Any] = {
        "id": qid,
        "explanation": "",
        "img_type": "['Diagrams']",
        "topic_difficulty": rng.choice(["Easy", "Medium", "Hard"]),
        "subfield": f"{subject} basics",
    }
    if is_open:
        row.update(question=f"<image 1> What value does the {words} show?", options="[]",
                   answer=str(rng.randrange(1, 100)), question_type="open")
    else:
        n = rng.choice([4, 4, 5])
        options = [f"{rng.choice(_WORDS)} {k}" for k in range(n)]
        options[0] = "it's 'quoted'"  # quotes inside the literal exercise ast.literal_eval
        rng.shuffle(options)
        row.update(question=f"Which label fits the {words} in <image 1>?", options=repr(options),
                   answer=chr(ord("A") + rng.randrange(n)), question_type="multiple-choice")
    size = (rng.randrange(40, 80), rng.randrange(40, 80))
    row["image_1"] = {"bytes": png_bytes(rng, size), "path": f"{qid}_1.png"}
    row["image_2"] = {"bytes": png_bytes(rng, (32, 32)), "path": f"{qid}_2.png"} if index % 3 == 0 else None
    for i in range(3, MAX_IMAGES + 1):
        row[f"image_{i}"] = None
    return row


def write_split(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def write_synthetic_mmmu(out_dir: Path, subjects: list[str] | None = None, per_subject: int = 4,
                         seed: int = 0) -> Path:
    """Write ``per_subject`` validation (and up to 5 dev) questions per subject; returns ``out_dir``.

    Deterministic for a given ``seed``. Default subjects span all six MMMU disciplines.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    for subject in subjects or DEFAULT_SUBJECTS:
        for split, count in (("validation", per_subject), ("dev", min(per_subject, 5))):
            rows = [_row(rng, split, subject, i) for i in range(1, count + 1)]
            write_split(out_dir / subject / f"{split}-00000-of-00001.parquet", rows)
    return out_dir

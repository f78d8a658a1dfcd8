"""MMMU on local disk: the hub's parquet layout read with pyarrow, one question record per row.

Layout: ``<data_dir>/<Subject>/<split>-*.parquet`` (30 subject folders). Rows that cannot be used
(malformed ``options``, missing or undecodable ``image_1``) are skipped and counted by reason, never
fatal, so one bad row cannot sink a 900-question run.
"""
from __future__ import annotations

import ast
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from accelbench.errors import DataError

# MMMU's discipline -> subject table (official DOMAIN_CAT2SUB_CAT).
DISCIPLINES: dict[str, list[str]] = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy", "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
        "Energy_and_Power", "Materials", "Mechanical_Engineering",
    ],
}
SUBJECT_TO_DISCIPLINE: dict[str, str] = {s: d for d, subs in DISCIPLINES.items() for s in subs}
SUBJECTS: list[str] = sorted(SUBJECT_TO_DISCIPLINE)

REQUIRED_COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
OPTIONAL_COLUMNS = ("subfield", "topic_difficulty", "img_type")
MULTIPLE_CHOICE = "multiple-choice"

# Skip reasons (keys of the ``skipped`` dict).
SKIP_MALFORMED_OPTIONS = "malformed_options"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_UNDECODABLE_IMAGE = "undecodable_image"
SKIP_DUPLICATE_ID = "duplicate_id"
SKIP_UNKNOWN_FOLDER = "unknown_subject_folder"
SKIP_NO_SPLIT_FILES = "no_split_files"


class MMMUDataError(DataError):
    """Bad MMMU input; the message names the file/question and how to fix it."""


@dataclass
class MMMUQuestion:
    id: str
    subject: str
    question: str
    options: list[str]
    question_type: str
    answer: str | list[str]
    image: Image.Image | None
    raw_options: str
    subfield: str = ""
    topic_difficulty: str = ""
    img_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return self.question_type == MULTIPLE_CHOICE

    @property
    def discipline(self) -> str:
        return SUBJECT_TO_DISCIPLINE.get(self.subject, "Other")


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def parse_options(options: str | list[Any], where: str = "options") -> tuple[list[str], dict[str, str]]:
    """``(all_choices, index2ans)`` from MMMU's ``options`` (a Python list literal string, or a list).

    Letters are A, B, C... in order. Parsed with ``ast.literal_eval`` (the column is data, never code).
    """
    if isinstance(options, str):
        try:
            with warnings.catch_warnings():  # LaTeX such as \cos is an invalid escape: kept verbatim
                warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
                value = ast.literal_eval(options)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise MMMUDataError(
                f"{where}: cannot parse options {options[:80]!r} as a Python list literal ({exc.__class__.__name__}); "
                "re-download the subject's parquet from the MMMU/MMMU hub dataset"
            ) from None
    else:
        value = options
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        raise MMMUDataError(
            f"{where}: options must be a list of strings, got {type(value).__name__}; "
            "re-download the subject's parquet from the MMMU/MMMU hub dataset"
        )
    if len(value) > 26:
        raise MMMUDataError(f"{where}: {len(value)} options is more than the 26 letters A-Z")
    letters = choice_letters(len(value))
    return letters, dict(zip(letters, value))


def parse_answer(raw: Any, question_type: str) -> str | list[str]:
    """Gold answer: a string, or a list for open questions whose answer column holds a list literal."""
    text = "" if raw is None else str(raw)
    if question_type != MULTIPLE_CHOICE and text.lstrip().startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text
        if isinstance(value, list) and value:
            return [str(v) for v in value]
    return text


def decode_image(cell: Any) -> Image.Image:
    """An ``{bytes, path}`` image struct to an RGB PIL image; LookupError if absent, ValueError if undecodable."""
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise LookupError("no image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force decoding now so bad bytes fail here, not mid-evaluation
        return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"undecodable image: {exc}") from None


def _split_files(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}-*.parquet"))


def id_order(qid: str) -> tuple[int, str]:
    """Natural order of ids like ``validation_Art_12`` (numeric suffix, not lexicographic)."""
    m = re.search(r"(\d+)$", qid)
    return (int(m.group(1)) if m else 1 << 30, qid)


def read_subject_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one parquet file, reading only the columns LLaVA-1.5 evaluation needs."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:
        raise MMMUDataError(f"{path}: not a readable parquet file ({exc}); re-download it") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise MMMUDataError(
            f"{path}: missing column(s) {missing}; expected the MMMU/MMMU hub schema "
            f"({', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}); re-download it"
        )
    cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
    return pq.read_table(path, columns=cols).to_pylist()


def _row_to_question(row: dict[str, Any], subject: str, path: Path) -> MMMUQuestion:
    """One parquet row to a question; raises (reason, message) via _Skip for unusable rows."""
    qid = str(row["id"])
    qtype = str(row.get("question_type") or "")
    raw_options = row.get("options")
    raw_options = "[]" if raw_options is None else str(raw_options)
    try:
        _, index2ans = parse_options(raw_options, where=f"{path}:{qid}")
    except MMMUDataError:
        raise _Skip(SKIP_MALFORMED_OPTIONS) from None
    if qtype == MULTIPLE_CHOICE and not index2ans:
        raise _Skip(SKIP_MALFORMED_OPTIONS)
    try:
        image = decode_image(row.get("image_1"))
    except LookupError:
        raise _Skip(SKIP_MISSING_IMAGE) from None
    except ValueError:
        raise _Skip(SKIP_UNDECODABLE_IMAGE) from None
    return MMMUQuestion(
        id=qid, subject=subject, question=str(row.get("question") or ""),
        options=list(index2ans.values()), question_type=qtype,
        answer=parse_answer(row.get("answer"), qtype), image=image, raw_options=raw_options,
        subfield=str(row.get("subfield") or ""), topic_difficulty=str(row.get("topic_difficulty") or ""),
        img_type=str(row.get("img_type") or ""),
    )


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _resolve_subjects(root: Path, subjects: list[str] | None, skipped: dict[str, list[str]]) -> list[str]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subjects is None:
        unknown = [f for f in folders if f not in SUBJECT_TO_DISCIPLINE]
        if unknown:
            skipped.setdefault(SKIP_UNKNOWN_FOLDER, []).extend(unknown)
        return [f for f in folders if f in SUBJECT_TO_DISCIPLINE]
    absent = [s for s in subjects if s not in folders]
    if absent:
        raise MMMUDataError(
            f"{root}: no folder for requested subject(s) {absent}; folders found: {folders or 'none'}. "
            f"Subject names are case-sensitive MMMU names such as {SUBJECTS[:3]}; point data_dir at the "
            "MMMU/MMMU snapshot root"
        )
    return sorted(dict.fromkeys(subjects))


def load_mmmu(
    data_dir: str | Path, split: str = "validation", subjects: list[str] | None = None,
    limit: int | None = None, per_subject_limit: int | None = None,
) -> tuple[list[MMMUQuestion], dict[str, list[str]]]:
    """Questions of ``split`` in subject order, plus ``{skip reason: [ids or folder names]}``.

    ``limit`` caps the total, ``per_subject_limit`` each subject (for quick smoke runs).
    Requested subjects without a folder raise :class:`MMMUDataError`; folders that are not MMMU
    subjects (when ``subjects`` is None) are skipped and counted.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise MMMUDataError(f"{root}: MMMU data directory does not exist; download MMMU/MMMU and pass its root")
    skipped: dict[str, list[str]] = {}
    questions: list[MMMUQuestion] = []
    seen: set[str] = set()
    for subject in _resolve_subjects(root, subjects, skipped):
        files = _split_files(root / subject, split)
        if not files:
            if subjects is not None:
                raise MMMUDataError(
                    f"{root / subject}: no {split}-*.parquet files; download the {split} split of MMMU/MMMU"
                )
            skipped.setdefault(SKIP_NO_SPLIT_FILES, []).append(subject)
            continue
        taken = 0
        rows = [(r, f) for f in files for r in read_subject_rows(f)]
        rows.sort(key=lambda rf: id_order(str(rf[0]["id"])))
        for row, path in rows:
            if limit is not None and len(questions) >= limit:
                return questions, skipped
            if per_subject_limit is not None and taken >= per_subject_limit:
                break
            qid = str(row["id"])
            try:
                if qid in seen:
                    raise _Skip(SKIP_DUPLICATE_ID)
                q = _row_to_question(row, subject, path)
            except _Skip as skip:
                skipped.setdefault(skip.reason, []).append(qid)
                continue
            seen.add(qid)
            questions.append(q)
            taken += 1
    return questions, skipped

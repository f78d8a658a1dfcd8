"""MMMU loader through write_synthetic_mmmu output (the same parquet code path as real MMMU)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from accelbench.eval.mmmu import MMMUDataError, load_mmmu
from accelbench.eval.mmmu_data import SUBJECT_TO_DISCIPLINE, SUBJECTS, parse_answer
from accelbench.eval.mmmu_synth import DEFAULT_SUBJECTS, write_split, write_synthetic_mmmu

HUB_COLUMNS = (["id", "question", "options", "explanation"] + [f"image_{i}" for i in range(1, 8)]
               + ["img_type", "answer", "topic_difficulty", "question_type", "subfield"])


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmmu(tmp_path_factory.mktemp("mmmu"), per_subject=5)


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_subject_table_is_mmmu() -> None:
    assert len(SUBJECTS) == 30
    assert SUBJECT_TO_DISCIPLINE["Psychology"] == "Humanities and Social Science"
    assert SUBJECT_TO_DISCIPLINE["Manage"] == "Business"


def test_synthetic_layout_and_columns(synth: Path) -> None:
    assert sorted(p.name for p in synth.iterdir()) == sorted(DEFAULT_SUBJECTS)
    assert len({SUBJECT_TO_DISCIPLINE[s] for s in DEFAULT_SUBJECTS}) == 6  # spans every discipline
    f = synth / "Art" / "validation-00000-of-00001.parquet"
    assert pq.read_schema(f).names == HUB_COLUMNS
    assert (synth / "Art" / "dev-00000-of-00001.parquet").exists()
    row = _rows(f)[0]
    assert set(row["image_1"]) == {"bytes", "path"} and row["image_1"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(row["options"], str)


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_mmmu(tmp_path / "a", subjects=["Math"], per_subject=3, seed=7)
    b = write_synthetic_mmmu(tmp_path / "b", subjects=["Math"], per_subject=3, seed=7)
    name = "Math/validation-00000-of-00001.parquet"
    assert _rows(a / name) == _rows(b / name)


def test_load_all(synth: Path) -> None:
    qs, skipped = load_mmmu(synth)
    assert skipped == {}
    assert len(qs) == 5 * len(DEFAULT_SUBJECTS)
    assert [q.subject for q in qs] == sorted(q.subject for q in qs)  # subject order
    types = {q.question_type for q in qs}
    assert types == {"multiple-choice", "open"}
    for q in qs:
        assert isinstance(q.image, Image.Image) and q.image.mode == "RGB"
        assert q.id.startswith(f"validation_{q.subject}_")
        assert "<image 1>" in q.question  # question text is kept as is
        if q.question_type == "multiple-choice":
            assert 4 <= len(q.options) <= 5 and q.answer in "ABCDE"
            assert "it's 'quoted'" in q.options  # literal_eval handled the embedded quotes
            assert q.raw_options.startswith("[")
        else:
            assert q.options == [] and q.answer.isdigit()


def test_load_split_subjects_and_limits(synth: Path) -> None:
    qs, _ = load_mmmu(synth, split="dev", subjects=["History", "Art"])
    assert {q.subject for q in qs} == {"Art", "History"} and all(q.id.startswith("dev_") for q in qs)
    assert len(load_mmmu(synth, limit=7)[0]) == 7
    qs, _ = load_mmmu(synth, per_subject_limit=2)
    assert len(qs) == 2 * len(DEFAULT_SUBJECTS)


def test_ids_in_natural_order(tmp_path: Path) -> None:
    root = write_synthetic_mmmu(tmp_path, subjects=["Math"], per_subject=12)
    qs, _ = load_mmmu(root)
    assert [q.id for q in qs][8:11] == ["validation_Math_9", "validation_Math_10", "validation_Math_11"]


def test_bad_rows_are_counted_skips(tmp_path: Path) -> None:
    root = write_synthetic_mmmu(tmp_path, subjects=["Physics", "Music"], per_subject=5)
    f = root / "Physics" / "validation-00000-of-00001.parquet"
    rows = _rows(f)
    rows[0]["options"] = "['a', 'b'"                       # unterminated literal
    rows[1]["image_1"] = None                              # missing image
    rows[2]["image_1"] = {"bytes": b"not a png", "path": "x.png"}  # undecodable
    rows[3]["options"] = "[]" if rows[3]["question_type"] == "multiple-choice" else "{'x': 1}"
    write_split(f, rows)
    qs, skipped = load_mmmu(root)
    assert skipped == {
        "malformed_options": ["validation_Physics_1", "validation_Physics_4"],
        "missing_image": ["validation_Physics_2"],
        "undecodable_image": ["validation_Physics_3"],
    }
    assert [q.id for q in qs if q.subject == "Physics"] == ["validation_Physics_5"]
    assert len([q for q in qs if q.subject == "Music"]) == 5  # other subjects unaffected


def test_unknown_subject_requested_names_it_and_folders(synth: Path) -> None:
    with pytest.raises(MMMUDataError) as err:
        load_mmmu(synth, subjects=["Art", "Alchemy"])
    msg = str(err.value)
    assert "Alchemy" in msg and "Biology" in msg  # names the missing one and lists what exists


def test_unknown_folder_is_skipped(tmp_path: Path) -> None:
    root = write_synthetic_mmmu(tmp_path, subjects=["Art"], per_subject=2)
    (root / "Alchemy").mkdir()
    (root / "Geography").mkdir()  # a known subject without the split
    qs, skipped = load_mmmu(root)
    assert len(qs) == 2
    assert skipped == {"unknown_subject_folder": ["Alchemy"], "no_split_files": ["Geography"]}
    with pytest.raises(MMMUDataError, match="Geography"):
        load_mmmu(root, subjects=["Geography"])


def test_missing_column_and_missing_dir(tmp_path: Path) -> None:
    root = write_synthetic_mmmu(tmp_path, subjects=["Art"], per_subject=2)
    f = root / "Art" / "validation-00000-of-00001.parquet"
    pq.write_table(pq.read_table(f).drop(["options"]), f)
    with pytest.raises(MMMUDataError, match=r"validation-00000-of-00001\.parquet.*options"):
        load_mmmu(root)
    with pytest.raises(MMMUDataError, match="does not exist"):
        load_mmmu(tmp_path / "nowhere")


def test_parse_answer() -> None:
    assert parse_answer("['1.06', '1.07']", "open") == ["1.06", "1.07"]
    assert parse_answer("[broken", "open") == "[broken"
    assert parse_answer("B", "multiple-choice") == "B"
    assert parse_answer(None, "open") == ""

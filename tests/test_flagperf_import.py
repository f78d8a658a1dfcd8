"""`accelbench import-flagperf`: FlagPerf case READMEs (Chinese) to comparison entries."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_fixtures import report_cli

from accelbench.errors import AccelbenchError
from accelbench.report.flagperf_import import SCHEMA, import_flagperf, parse_flagperf

FIXTURES = Path(__file__).parent / "fixtures"
ILUVATAR = FIXTURES / "flagperf_iluvatar_llava1.5_13b.md"  # the published Iluvatar BI-V150 page, verbatim
A800 = FIXTURES / "flagperf_a800_llava1.5_13b.md"

HEADER = "| 配置 | fix_hp | token/p/s | loss | mem | acc(MMMU) | MFU |\n| --- | --- | --- | --- | --- | --- | --- |\n"


def test_iluvatar_page_figures():
    entry = import_flagperf(ILUVATAR)
    assert entry["schema"] == SCHEMA and entry["source"] == str(ILUVATAR)
    assert entry["vendor"] == "Iluvatar" and entry["device"] == "Bi-150" and entry["device_count"] == 8
    assert entry["dtype"] == "bf16" and entry["MPE"] == 2048
    assert entry["accounting"]["chips_per_board"] == 2 and entry["accounting"]["basis"] == "per card"
    ft, pt = entry["stages"]["finetune"], entry["stages"]["pretrain"]
    assert ft["tokens_per_s_per_proc"] == 249.93
    assert ft["mfu"] == pytest.approx(0.1015)
    assert (ft["mem_used_gib"], ft["mem_total_gib"]) == (61.14, 64.0)
    assert ft["mmmu_accuracy"] == pytest.approx(0.351)
    assert ft["loss"] == 0.7641
    assert pt["tokens_per_s_per_proc"] == 620.38
    assert pt["mfu"] == pytest.approx(0.0840)
    assert (pt["mem_used_gib"], pt["mem_total_gib"]) == (62.23, 64.0)
    assert pt["loss"] == 2.0578 and pt["mmmu_accuracy"] is None
    assert pt["fix_hp"] is None and ft["fix_hp"] is None
    assert pt["config"] == "Bi-150单机8卡（1x8）（pretrain）"  # as published
    assert [r["line"] for r in entry["rows"]] == [64, 65]


def test_a800_fixture_figures():
    entry = import_flagperf(A800)
    assert entry["vendor"] == "NVIDIA" and entry["device"] == "A800" and entry["device_count"] == 8
    assert (entry["nnodes"], entry["nproc_per_node"]) == (1, 8)
    assert entry["accounting"]["chips_per_board"] == 1
    pt, ft = entry["stages"]["pretrain"], entry["stages"]["finetune"]
    assert pt["tokens_per_s_per_proc"] == 2273.54 and pt["mfu"] == pytest.approx(0.1895)
    assert ft["tokens_per_s_per_proc"] == 1622.90 and ft["mfu"] == pytest.approx(0.4057)
    assert ft["mmmu_accuracy"] == pytest.approx(0.362)
    # "/" cells: values the published page does not give
    assert pt["loss"] is None and pt["mem_used_gib"] is None and ft["loss"] is None and ft["mem_total_gib"] is None
    assert entry["dtype"] is None


def test_tolerates_spacing_fullwidth_and_surrounding_text():
    text = ("# some page\n\nprose | with a pipe\n\n"
            "|配置|  fix_hp |token/p/s|loss|mem|acc（MMMU）|MFU|\n|:--|--|--:|--|--|--|--|\n"
            "|X9 多机16卡 (2x8) ( finetune )|MBS=4|  12.5 |/|  10.5 / 32 |  40 |12 %|\n"
            + "\nafter the table | not a row\n")
    entry = parse_flagperf(text, "page.md")
    row = entry["stages"]["finetune"]
    assert row["stage"] == "finetune" and row["device"] == "X9" and row["device_count"] == 16
    assert row["fix_hp"] == "MBS=4" and row["tokens_per_s_per_proc"] == 12.5 and row["loss"] is None
    assert (row["mem_used_gib"], row["mem_total_gib"]) == (10.5, 32.0)
    assert row["mmmu_accuracy"] == pytest.approx(0.40) and row["mfu"] == pytest.approx(0.12)


@pytest.mark.parametrize("text, message", [
    ("# no table here\n| a | b |\n", r"page\.md: no FlagPerf performance table"),
    (HEADER + "| A800单机8卡（1x8）（pretrain） | / | 1.0 | / | / | / |\n", r"page\.md:3: performance row has 6 cells"),
    (HEADER + "| A800单机8卡（1x8）（pretrain） | / | fast | / | / | / | 1% |\n", r"page\.md:3: token/p/s cell 'fast'"),
    (HEADER + "| A800单机8卡（1x8） | / | 1.0 | / | / | / | 1% |\n", r"page\.md:3: config cell .* names no stage"),
    (HEADER + "| A800（pretrain） | / | 1.0 | / | 60GiB | / | 1% |\n", r"page\.md:3: mem cell '60GiB'"),
    (HEADER, r"page\.md:1: the performance table has no rows"),
    ("| 配置 | fix_hp | token/p/s | loss | mem | acc(MMMU) | MFU |\n| A800（pretrain） | / | 1 | / | / | / | 1% |\n",
     r"page\.md:2: expected the table's '\| --- \|' separator"),
    (HEADER + "| A（pretrain） | / | 1 | / | / | / | 1% |\n| A（pretrain） | / | 2 | / | / | / | 1% |\n",
     r"page\.md:4: a second pretrain row \(first on line 3\)"),
])
def test_bad_input_names_file_and_line(text, message):
    with pytest.raises(AccelbenchError, match=message):
        parse_flagperf(text, "page.md")


def test_unreadable_files(tmp_path):
    with pytest.raises(AccelbenchError, match="does not exist"):
        import_flagperf(tmp_path / "nope.md")
    binary = tmp_path / "bin.md"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AccelbenchError, match="not UTF-8"):
        import_flagperf(binary)


def test_command_json_and_out(tmp_path, capsys):
    out = tmp_path / "ilu.json"
    assert report_cli(["import-flagperf", str(ILUVATAR), "--json", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    parsed = json.loads(printed[:printed.rindex("}") + 1])
    assert [r["tokens_per_s_per_proc"] for r in parsed["rows"]] == [620.38, 249.93]
    assert json.loads(out.read_text(encoding="utf-8")) == parsed
    assert report_cli(["import-flagperf", str(A800)]) == 0
    human = capsys.readouterr().out
    assert "pretrain: token/p/s 2273.54" in human and "MFU 40.57%" in human and "MMMU 36.2" in human

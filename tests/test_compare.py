"""`accelbench compare`: the FlagPerf-layout table, ratios against a baseline, and the warnings for
runs that do not measure the same thing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_fixtures import make_run, report_cli

from accelbench.errors import AccelbenchError
from accelbench.report.compare import COLUMNS, compare

FIXTURES = Path(__file__).parent / "fixtures"


def _table(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[:1] + lines[2:]]


def _tps(run: Path, stage: str) -> float:
    return json.loads((run / "result.json").read_text())["stages"][stage]["metrics"]["tokens_per_s_per_proc"]


def test_two_cpu_runs_differing_in_micro_batch(tmp_path, capsys):
    a = make_run(tmp_path, "mbs4", mbs=4, seed=1)
    b = make_run(tmp_path, "mbs2", mbs=2, seed=2)
    assert report_cli(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    warning_at, table_at = out.index("WARNING:"), out.index("| # |")
    assert warning_at < table_at  # the warning comes first, where it cannot be missed
    assert "global batch (GBS) differs in pretrain: [1] mbs4 8, [2] mbs2 4" in out
    assert "global batch (GBS) differs in finetune: [1] mbs4 4, [2] mbs2 2" in out
    table = _table(out)
    assert table[0] == COLUMNS
    assert [(r[1], r[3]) for r in table[1:]] == [("mbs4", "pretrain"), ("mbs4", "finetune"),
                                                 ("mbs2", "pretrain"), ("mbs2", "finetune")]
    assert table[1][0] == "1 (base)" and table[1][6] == "1.00x"
    ratio = _tps(b, "finetune") / _tps(a, "finetune")
    assert table[4][5] == f"{_tps(b, 'finetune'):.2f}"
    assert table[4][6] == f"{ratio:.2f}x"
    assert table[1][2] == "AMD EPYC x 1 (1x1)"
    assert "dtype=fp32" in table[1][4]


def test_json_output_carries_warnings_rows_and_ratios(tmp_path, capsys):
    a = make_run(tmp_path, "a", mbs=4, seed=1)
    b = make_run(tmp_path, "b", mbs=2, seed=2)
    assert report_cli(["compare", str(a), str(b), "--baseline", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["baseline"] == 2 and report["baseline_run"] == "b"
    assert any("global batch (GBS)" in w for w in report["warnings"])
    rows = {(r["run"], r["stage"]): r for r in report["rows"]}
    assert rows[("b", "pretrain")]["tokens_per_s_ratio"] == pytest.approx(1.0)
    assert rows[("a", "pretrain")]["tokens_per_s_ratio"] == pytest.approx(_tps(a, "pretrain") / _tps(b, "pretrain"))
    mfu_a, mfu_b = rows[("a", "finetune")]["mfu"], rows[("b", "finetune")]["mfu"]
    assert rows[("a", "finetune")]["mfu_ratio"] == pytest.approx(mfu_a / mfu_b)
    assert report["mfu_formula"] == "accelbench"


def test_matching_runs_have_no_warning(tmp_path):
    a, b = make_run(tmp_path, "a", seed=1), make_run(tmp_path, "b", seed=2)
    report = compare([a, b])
    assert report["warnings"] == []
    assert len(report["rows"]) == 4


@pytest.mark.parametrize("change, needle", [
    ({"seq": 1024}, "sequence cap (MPE) differs"),
    ({"dtype": "bf16"}, "dtype differs"),
    ({"random_weights": False}, "random vs real weights"),
    ({"chips_per_board": 2, "basis": "per chip"}, "accounting basis differs"),
])
def test_each_meaning_changing_difference_warns(tmp_path, change, needle):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", **change)
    warnings = compare([a, b])["warnings"]
    assert len(warnings) >= 1 and any(needle in w for w in warnings), warnings


def test_published_flagperf_rows_sit_in_the_table(tmp_path, capsys):
    run = make_run(tmp_path, "cpu", dtype="bf16")
    imported = tmp_path / "a800.json"
    assert report_cli(["import-flagperf", str(FIXTURES / "flagperf_a800_llava1.5_13b.md"), "--out", str(imported)]) == 0
    capsys.readouterr()
    assert report_cli(["compare", str(imported), str(run)]) == 0
    out = capsys.readouterr().out
    table = _table(out)
    a800 = [r for r in table[1:] if r[1] == "FlagPerf NVIDIA A800"]
    assert [r[3] for r in a800] == ["pretrain", "finetune"]
    assert a800[0][5] == "2273.54" and a800[0][10] == "18.95%"
    assert a800[1][5] == "1622.90" and a800[1][9] == "36.2" and a800[1][10] == "40.57%"
    assert a800[0][2] == "A800 x 8 (1x8)" and a800[0][7] == "/" and a800[0][8] == "/"
    report = compare([imported, run])
    # one MFU formula per column: the run's figure is its FlagPerf-formula MFU
    cpu_ft = next(r for r in report["rows"] if r["run"] == "cpu" and r["stage"] == "finetune")
    metrics = json.loads((run / "result.json").read_text())["stages"]["finetune"]["metrics"]
    assert report["mfu_formula"] == "flagperf" and cpu_ft["mfu"] == pytest.approx(metrics["mfu_flagperf"])
    assert cpu_ft["mfu_ratio"] == pytest.approx(metrics["mfu_flagperf"] / 0.4057)
    assert any("random vs real weights" in w for w in report["warnings"])
    assert any("global batch (GBS) in pretrain is not stated by [1] FlagPerf NVIDIA A800" in w
               for w in report["warnings"])


def test_iluvatar_page_given_directly_warns_about_per_card_basis(tmp_path):
    run = make_run(tmp_path, "cpu", dtype="bf16")
    report = compare([run, FIXTURES / "flagperf_iluvatar_llava1.5_13b.md"])
    assert any("accounting basis differs" in w and "per card (2 chip(s) per board)" in w for w in report["warnings"])
    ilu = [r for r in report["rows"] if r["kind"] == "flagperf"]
    assert [r["tokens_per_s_per_proc"] for r in ilu] == [620.38, 249.93]


def test_bad_inputs(tmp_path):
    run = make_run(tmp_path, "a")
    with pytest.raises(AccelbenchError, match="--baseline 3 is out of range"):
        compare([run, run], baseline=3)
    with pytest.raises(AccelbenchError, match="does not exist"):
        compare([tmp_path / "missing"])
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something/1"}')
    with pytest.raises(AccelbenchError, match="neither an accelbench result"):
        compare([other])

"""report.md / report.html / plots rendered from a run, checked against its result.json and events.jsonl;
the HTML loaded in headless Chromium; progress output on a non-terminal stream."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import make_run, report_cli

from accelbench.report.html import write_reports
from accelbench.report.markdown import performance_rows
from accelbench.report.plots import WARMUP_LABEL, read_events

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Tables(HTMLParser):
    """Collect every <table id=...> as rows of cell texts, every section id, and every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: set[str] = set()
        self.imgs: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in {"td", "th"}:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a.get("src", ""))

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag in {"td", "th"} and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):  # noqa: ANN001
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Tables:
    p = _Tables()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("runs"), "cpu_run")
    out = write_reports(run)
    return run, out, json.loads((run / "result.json").read_text())


def _md_table(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]


def test_markdown_sections_and_values_match_result(rendered):
    run, out, result = rendered
    md = out["markdown"].read_text(encoding="utf-8")
    for heading in ("#### Environment", "- ##### Hardware", "- ##### Software", "- ##### Parallel strategy",
                    "- ##### Optimisation strategy", "- ##### Pre-run changes", "* Input batch sizes",
                    "* General metrics", "* Performance"):
        assert heading in md, heading
    perf = _md_table(md, "config")
    expected = performance_rows(result)
    assert perf[0] == list(expected[0])
    assert perf[1:] == [list(r.values()) for r in expected]
    # the figures in the table are result.json's, formatted
    m = result["stages"]["finetune"]["metrics"]
    assert f"{m['tokens_per_s_per_proc']:.2f}" in perf[2]
    assert f"{m['loss_last']:.4f}" in perf[2]
    assert f"{result['mmmu']['accuracy'] * 100:.1f}" in perf[2]
    batch = _md_table(md, "stage")
    assert batch[1:] == [[s, *(str(e["batch"][k]) for k in ("LBS", "MPE", "GAS", "GBS"))]
                         for s, e in result["stages"].items()]


def test_html_sections_tables_and_escaping(rendered):
    run, out, result = rendered
    html = out["html"].read_text(encoding="utf-8")
    page = _parse(html)
    for sid in ("environment", "hardware", "software", "parallel-strategy", "optimisation-strategy",
                "pre-run-changes", "batch-sizes", "general-metrics", "performance", "plots"):
        assert sid in page.ids, sid
    perf = page.tables["performance-table"]
    rows = performance_rows(result)
    assert perf[0] == list(rows[0])
    assert perf[1:] == [list(r.values()) for r in rows]
    assert page.tables["batch-table"][1:] == [[s, *(str(e["batch"][k]) for k in ("LBS", "MPE", "GAS", "GBS"))]
                                              for s, e in result["stages"].items()]
    for key in ("LBS", "MPE", "GAS", "GBS"):  # definitions with their values
        assert re.search(rf"<strong>{key}</strong>: .*Values: pretrain \d+, finetune \d+", html), key
    changes = page.tables["pre-run-changes-table"][1:]
    assert len(changes) == len(result["adjustments"])
    assert [c[3] for c in changes] == [a["what"] for a in result["adjustments"]]
    general = {r[0]: r[1] for r in page.tables["general-metrics-table"][1:]}
    assert general["precision"] == result["stages"]["pretrain"]["plan"]["dtype"]
    assert general["model"] == result["model"]["case"]
    sw = result["environment"]["software"]
    assert f"deepspeed {sw['deepspeed']}" in html and f"torch {sw['torch']}" in html
    assert "sharded data parallel" in html and "gradient checkpointing" in html
    # backend text is escaped, never markup
    assert "<fast & safe>" not in html and "&lt;fast &amp; safe&gt;" in html
    for note in result["notes"]:
        assert note in html


def test_html_is_self_contained(rendered):
    _, out, _ = rendered
    html = out["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "@import" not in html and "url(" not in html and "<script" not in html.lower()
    page = _parse(html)
    assert len(page.imgs) == len(out["plots"]) == 4
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_plots_exist_and_count_points_from_events(rendered):
    run, out, result = rendered
    events = read_events(run)
    plots = {p.name: p for p in out["plots"]}
    assert set(plots) == {"loss", "throughput", "memory", "mmmu"}
    for p in plots.values():
        data = p.path.read_bytes()
        assert p.path.parent == run / "plots"
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p.path
    for stage, entry in result["stages"].items():
        n = sum(1 for e in events if e["stage"] == stage)
        warm = entry["metrics"]["warmup_steps_excluded"]
        assert n == entry["metrics"]["steps"]
        assert plots["loss"].points[stage] == n
        assert plots["memory"].points[stage] == n
        assert plots["throughput"].points[f"{stage} warm-up"] == warm >= 1
        assert plots["throughput"].points[f"{stage} steady"] == n - warm == entry["metrics"]["steady_steps"]
    assert WARMUP_LABEL in plots["throughput"].legend
    assert any(label.startswith("device total") for label in plots["memory"].legend)
    assert plots["mmmu"].points["disciplines"] == len(json.loads((run / "mmmu.json").read_text())["per_discipline"])


def test_warmup_taken_from_result_when_events_lack_the_flag(tmp_path):
    # the trainer marks warm-up after the stage, so events.jsonl may say warmup=false for every step
    run = make_run(tmp_path, events_warmup_flag=False, steps=12)
    assert not any(e["warmup"] for e in read_events(run))
    plots = {p.name: p for p in write_reports(run)["plots"]}
    result = json.loads((run / "result.json").read_text())
    for stage, entry in result["stages"].items():
        assert plots["throughput"].points[f"{stage} warm-up"] == entry["metrics"]["warmup_steps_excluded"] == 2


def test_report_without_events_or_mmmu(tmp_path):
    run = make_run(tmp_path, mmmu=False)
    (run / "events.jsonl").unlink()
    out = write_reports(run)
    assert out["plots"] == []
    assert "no per-step events or MMMU results to plot" in out["html"].read_text(encoding="utf-8")


def test_report_command_and_bad_dir(tmp_path, capsys):
    from accelbench.errors import AccelbenchError

    run = make_run(tmp_path)
    assert report_cli(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "plot throughput" in printed
    assert (run / "report.html").exists() and (run / "report.md").exists()
    with pytest.raises(AccelbenchError, match="result.json does not exist"):
        report_cli(["report", str(tmp_path / "nothing")])


# -- the page in a real browser ---------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--enable-logging=stderr", "--v=0"]


def _chromium_dom(page: Path) -> tuple[str, list[str]]:
    """The DOM after load, and the page's console lines (Chromium logs them as ...:CONSOLE...)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return proc.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_html_loads_in_headless_chromium_without_console_errors(rendered, tmp_path):
    _, out, result = rendered
    dom, console = _chromium_dom(out["html"])
    assert console == []
    assert dom.rstrip().endswith("</html>")
    page = _parse(dom)
    assert {"environment", "performance", "plots"} <= page.ids
    assert page.tables["performance-table"][1:] == [list(r.values()) for r in performance_rows(result)]
    assert len(page.imgs) == 4
    # the check itself must see errors: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefined_fn();</script></body></html>", encoding="utf-8")
    assert any("Uncaught" in ln for ln in _chromium_dom(bad)[1])


# -- progress on a non-terminal stream -----------------------------------------------------------
def test_progress_is_line_based_on_a_non_tty_stream(monkeypatch):
    from accelbench import progress as progress_mod

    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()  # isatty() is False: no tqdm bar
    p = progress_mod.Progress("finetune", total=20, unit="step", stream=stream)
    for done in range(1, 21):
        clock[0] += 1.0  # one step per second; a line every 5 s, plus the first and the last
        p.update_to(done, loss=1.5)
    p.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [int(re.search(r"\] (\d+)/20 ", ln).group(1)) for ln in lines] == [1, 6, 11, 16, 20]
    for ln in lines:
        assert ln.startswith("[finetune] ") and re.search(r"\d+/20 step", ln) and re.search(r"eta \d+s", ln)
        assert "loss=1.5" in ln
    assert lines[-1].endswith("loss=1.5") and "eta 0s" in lines[-1]


def test_progress_quiet_prints_nothing():
    from accelbench.progress import Progress

    stream = io.StringIO()
    p = Progress("x", total=3, quiet=True, stream=stream)
    for i in range(1, 4):
        p.update_to(i)
    assert stream.getvalue() == ""


# -- one real run, end to end ----------------------------------------------------------------------
@pytest.mark.slow
def test_real_cpu_run_renders_reports(cli, tmp_path):
    run = tmp_path / "real"
    # --no-eval: MMMU costs ~25 s here; its plot is covered by the fixture runs above
    proc = cli("run", "--out", str(run), "--steps", "4", "--no-eval", "--quiet", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = write_reports(run)
    result = json.loads((run / "result.json").read_text())
    events = read_events(run)
    plots = {p.name: p for p in out["plots"]}
    for stage, entry in result["stages"].items():
        assert plots["loss"].points[stage] == sum(1 for e in events if e["stage"] == stage) == 4
        assert plots["throughput"].points[f"{stage} warm-up"] == entry["metrics"]["warmup_steps_excluded"]
    page = _parse(out["html"].read_text(encoding="utf-8"))
    assert page.tables["performance-table"][1:] == [list(r.values()) for r in performance_rows(result)]
    assert set(plots) == {"loss", "throughput", "memory"}

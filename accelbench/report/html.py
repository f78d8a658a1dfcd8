"""report.html: one self-contained page (inline CSS, base64 PNG plots, no script, no external URL)
with the same sections as report.md, plus the plots.

Every piece of text from result.json goes through html.escape: device names, reasons and backend
notes come from plugins and the environment, and must never become markup.
"""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any, Iterable

from ..atomic import write_text_atomic
from .markdown import GIB, NA, device_label, performance_rows, render_markdown
from .plots import Plot, make_plots
from .result import read_result

REPORT_MD = "report.md"
REPORT_HTML = "report.html"

BATCH_DEFINITIONS = {
    "LBS": "local_batchsize (micro_batchsize): the batch that enters the model per process.",
    "MPE": "seqlength (max_position_embedding): the sequence cap (model_max_length); real lengths vary, "
           "and MFU counts each sample's real length.",
    "GAS": "gradient_accumulate_steps.",
    "GBS": "global_batchsize = LBS x GAS x data_parallel_size (data parallel only, so dp size = world size).",
}

# No web fonts, no external stylesheet: the page must render offline with no failed requests.
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;margin:2rem auto;
max-width:72rem;padding:0 1.5rem;color:#1d232a;line-height:1.45;background:#fff}
h1{font-size:1.6rem;border-bottom:2px solid #d0d7de;padding-bottom:.4rem}
h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.25rem}
h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f5f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{background:#fff4e5;border-left:4px solid #e36209;padding:.5rem 1rem}
.note{background:#f3f5f7;border-left:4px solid #8c959f;padding:.4rem 1rem;margin:.3rem 0}
figure{margin:1rem 0 2rem}
figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:.85rem;color:#57606a}
code{background:#f3f5f7;padding:0 .25rem;border-radius:3px}
footer{margin-top:3rem;font-size:.8rem;color:#57606a}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _table(header: list[str], rows: Iterable[Iterable[Any]], *, table_id: str | None = None,
           numeric: set[int] | frozenset[int] = frozenset()) -> str:
    attr = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>\n"
        for row in rows)
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _list(items: Iterable[Any]) -> str:
    return "<ul>\n" + "".join(f"<li>{_e(i)}</li>\n" for i in items) + "</ul>\n"


def _kv_list(pairs: Iterable[tuple[str, Any]]) -> str:
    return "<ul>\n" + "".join(f"<li><strong>{_e(k)}:</strong> {_e(v)}</li>\n" for k, v in pairs) + "</ul>\n"


def general_metrics_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The FlagPerf '通用指标' table (metric, value, note); the same rows as report.md."""
    first = next(iter(result["stages"].values()))["plan"]
    model = result["model"]
    return [
        ("task", "multimodal LLM training", "LLaVA-1.5 two stages"),
        ("model", model["case"], "random weights" if model["random_weights"] else "pretrained weights"),
        ("dataset", result["data"].get("name", "LLaVA-format JSON"), ""),
        ("precision", first["dtype"], ""),
        ("hyper-parameter changes", "fix_hp, see the performance table", "needed to run on this backend"),
        ("device", device_label(result), ""),
        ("device memory", "mem, see the performance table", "peak reserved / total, GiB per process"),
        ("compute utilisation", "MFU, see the performance table", "PaLM definition; accounting in docs/metrics.md"),
        ("throughput", "token/p/s, see the performance table", "real (non-pad) tokens per process per second, steady state"),
        ("MMMU (val)", "acc, see the performance table", "MMMU validation accuracy"),
    ]


def _environment(result: dict[str, Any]) -> str:
    env, ps = result["environment"], result["parallel_strategy"]
    hw, sw, host = env["hardware"], env["software"], env["host"]
    mem = hw.get("memory_bytes") or []
    peaks = [f"{p['dtype']}: {p['flops'] / 1e12:.1f} TFLOP/s {p.get('basis', 'per device')} ({p.get('source', '')})"
             if p.get("flops") else f"{p['dtype']}: unknown ({p.get('source', '')})" for p in hw.get("peak_flops", [])]
    hardware = [
        ("machine", host.get("hostname")),
        ("accelerator", f"{device_label(result)} x {hw.get('device_count', '?')} per node "
                        f"({hw.get('chips_per_board', 1)} chip(s) per board)"),
        ("vendor", hw.get("vendor")),
        ("CPU", host.get("cpu")),
        ("memory per device", f"{mem[0] / GIB:.1f} GiB" if mem else NA),
        ("peak FLOP/s", "; ".join(peaks) or NA),
    ]
    software = [
        ("OS", host.get("os")),
        ("driver / SDK", ", ".join(f"{k} {v}" for k, v in hw.get("versions", {}).items()) or NA),
        ("training framework", f"deepspeed {sw.get('deepspeed')}, torch {sw.get('torch')}, "
                               f"transformers {sw.get('transformers')}, accelbench {sw.get('accelbench')}"),
        ("other", ", ".join(f"{k} {v}" for k, v in sw.items()
                            if k not in {"deepspeed", "torch", "transformers", "accelbench"})),
        ("backend", f"{env['backend']} ({env['backend_plugin']['dist']} {env['backend_plugin']['version']}): "
                    f"{env['backend_selection']}"),
    ]
    parallel = [
        ("technique", ps["technique"]), ("implementer", ps["implementer"]),
        ("details", ", ".join(f"{s}: {z}" for s, z in ps["details"].items())),
        ("processes", f"{ps['nnodes']} node(s) x {ps['nproc_per_node']} (world size {ps.get('world_size', '?')})"),
    ]
    adjustments = result.get("adjustments", [])
    changes = (_table(["#", "stage", "by", "what", "from", "to", "why"],
                      [(i, a.get("stage"), a.get("by"), a.get("what"), a.get("from"), a.get("to"), a.get("why"))
                       for i, a in enumerate(adjustments, 1)], table_id="pre-run-changes-table")
               if adjustments else "<p>none</p>\n")
    return (
        '<section id="environment">\n<h2>Environment</h2>\n'
        f'<section id="hardware"><h3>Hardware</h3>\n{_kv_list(hardware)}</section>\n'
        f'<section id="software"><h3>Software</h3>\n{_kv_list(software)}</section>\n'
        f'<section id="parallel-strategy"><h3>Parallel strategy</h3>\n{_kv_list(parallel)}</section>\n'
        f'<section id="optimisation-strategy"><h3>Optimisation strategy</h3>\n'
        f'{_list(result.get("optimizations", [])) if result.get("optimizations") else "<p>none</p>"}</section>\n'
        '<section id="pre-run-changes"><h3>Pre-run changes (made by the backend and recorded, not by hand)</h3>\n'
        f"{changes}</section>\n</section>\n"
    )


def _batches(result: dict[str, Any]) -> str:
    stages = result["stages"]
    items = "".join(
        f"<li><strong>{_e(k)}</strong>: {_e(text)} Values: "
        + _e(", ".join(f"{s} {e['batch'].get(k, NA)}" for s, e in stages.items())) + "</li>\n"
        for k, text in BATCH_DEFINITIONS.items())
    rows = [(s, *(e["batch"].get(k, NA) for k in BATCH_DEFINITIONS)) for s, e in stages.items()]
    return ('<section id="batch-sizes">\n<h3>Input batch sizes</h3>\n'
            f"<ol>\n{items}</ol>\n"
            + _table(["stage", *BATCH_DEFINITIONS], rows, table_id="batch-table", numeric={1, 2, 3, 4})
            + "</section>\n")


def _performance(result: dict[str, Any]) -> str:
    rows = performance_rows(result)
    cols = list(rows[0]) if rows else []
    numeric = {i for i, c in enumerate(cols) if c not in {"config", "fix_hp"}}
    return ('<section id="performance">\n<h3>Performance</h3>\n'
            + _table(cols, [[r[c] for c in cols] for r in rows], table_id="performance-table", numeric=numeric)
            + "<p>Steady-state figures exclude the warm-up steps and the steps in which torch.compile made a "
              "graph, counted in result.json (<code>warmup_steps_excluded</code>, "
              "<code>compile_steps_excluded</code>).</p>\n</section>\n")


def _img_src(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _plots(plots: list[Plot]) -> str:
    if not plots:
        return '<section id="plots">\n<h2>Plots</h2>\n<p>no per-step events or MMMU results to plot</p>\n</section>\n'
    figs = "".join(
        f'<figure id="plot-{_e(p.name)}">\n<img alt="{_e(p.title)}" src="{_img_src(p.path)}">\n'
        f"<figcaption>{_e(p.title)} ({_e(', '.join(f'{k}: {v} points' for k, v in p.points.items()))})"
        "</figcaption>\n</figure>\n"
        for p in plots)
    return f'<section id="plots">\n<h2>Plots</h2>\n{figs}</section>\n'


def render_html(result: dict[str, Any], plots: list[Plot]) -> str:
    hw = result["environment"]["hardware"]
    title = f"{hw['vendor']} {device_label(result)}: configuration and run information"
    status = ""
    if result.get("status") != "ok":
        status = (f'<p class="status"><strong>status: {_e(result.get("status"))}</strong> '
                  f"{_e(result.get('reason') or '')}</p>\n")
    notes = "".join(f'<p class="note">{_e(n)}</p>\n' for n in result.get("notes", []))
    general = ('<section id="general-metrics">\n<h3>General metrics</h3>\n'
               + _table(["metric", "value", "note"], general_metrics_rows(result), table_id="general-metrics-table")
               + "</section>\n")
    sw = result["environment"]["software"]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # an empty data: icon stops the browser from requesting /favicon.ico
        '<link rel="icon" href="data:,">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n{status}{notes}"
        f"{_environment(result)}"
        f'<section id="run">\n<h2>Run</h2>\n{_batches(result)}{general}{_performance(result)}</section>\n'
        f"{_plots(plots)}"
        f"<footer>accelbench {_e(sw.get('accelbench'))}; run {_e(result.get('run_dir'))}, "
        f"created {_e(result.get('created'))}; rendered from result.json</footer>\n"
        "</body>\n</html>\n"
    )


def write_reports(run_dir: str | Path) -> dict[str, Any]:
    """Re-render report.md, draw the plots and write report.html; returns their paths and plot counts."""
    run_dir = Path(run_dir)
    result = read_result(run_dir)
    md_path, html_path = run_dir / REPORT_MD, run_dir / REPORT_HTML
    write_text_atomic(md_path, render_markdown(result))
    plots = make_plots(run_dir, result)
    write_text_atomic(html_path, render_html(result, plots))
    return {"markdown": md_path, "html": html_path, "plots": plots}

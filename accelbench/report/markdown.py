"""report.md in the layout of FlagPerf's llava1.5_13b case README (environment, strategy,
pre-run changes, batch sizes, general metrics, performance table)."""
from __future__ import annotations

from typing import Any

GIB = 2**30
NA = "/"  # FlagPerf's mark for a value that cannot exist (e.g. MMMU for pretrain)


def _pct(x: float | None) -> str:
    return NA if x is None else f"{x * 100:.2f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return NA if x is None else fmt.format(x)


def device_label(result: dict[str, Any]) -> str:
    hw = result["environment"]["hardware"]
    names = hw.get("device_names") or ["?"]
    return str(names[0])


def config_label(result: dict[str, Any], stage: str) -> str:
    ps = result["parallel_strategy"]
    return f"{device_label(result)} {ps['nnodes']}x{ps['nproc_per_node']} ({stage})"


def memory_cell(metrics: dict[str, Any]) -> str:
    """'used/total' GiB: peak reserved by the framework's allocator (RSS on CPU) against the device."""
    used = metrics.get("mem_peak_reserved") or metrics.get("mem_rss_peak")
    total = metrics.get("mem_device_total")
    if not used or not total:
        return NA
    return f"{used / GIB:.2f}/{total / GIB:.0f}"


def fix_hp(result: dict[str, Any], stage: str) -> str:
    changes = [a for a in result.get("adjustments", []) if a.get("stage") == stage and not a["what"].startswith("env ")]
    return "; ".join(f"{a['what']}={a['to']}" for a in changes) or NA


def mmmu_cell(result: dict[str, Any], stage: str) -> str:
    mmmu = result.get("mmmu")
    if stage != "finetune" or not mmmu or mmmu.get("accuracy") is None:
        return NA
    return f"{mmmu['accuracy'] * 100:.1f}"


def performance_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for stage, entry in result["stages"].items():
        m = entry.get("metrics") or {}
        rows.append({
            "config": config_label(result, stage), "fix_hp": fix_hp(result, stage),
            "token/p/s": _num(m.get("tokens_per_s_per_proc")), "loss": _num(m.get("loss_last"), "{:.4f}"),
            "mem": memory_cell(m), "acc(MMMU)": mmmu_cell(result, stage), "MFU": _pct(m.get("mfu")),
            "MFU (FlagPerf formula)": _pct(m.get("mfu_flagperf")), "HFU": _pct(m.get("hfu")),
        })
    return rows


def _table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return out


def render_markdown(result: dict[str, Any]) -> str:
    env, ps = result["environment"], result["parallel_strategy"]
    hw, sw = env["hardware"], env["software"]
    lines = [f"### {hw['vendor']} {device_label(result)}: configuration and run information", ""]
    if result.get("status") != "ok":
        lines += [f"> **status: {result.get('status')}** — {result.get('reason') or ''}", ""]
    lines += [f"> {n}" for n in result.get("notes", [])] + ([""] if result.get("notes") else [])
    lines += [
        "#### Environment", "",
        "- ##### Hardware",
        f"    - machine: {env['host']['hostname']}",
        f"    - accelerator: {device_label(result)} x {hw.get('device_count', '?')} per node "
        f"({hw.get('chips_per_board', 1)} chip(s) per board)",
        f"    - CPU: {env['host']['cpu']}",
        f"    - memory per device: {', '.join(f'{m / GIB:.1f} GiB' for m in hw.get('memory_bytes', [])[:1])}",
        "- ##### Software",
        f"    - OS: {env['host']['os']}",
        f"    - driver / SDK: {', '.join(f'{k} {v}' for k, v in hw.get('versions', {}).items())}",
        f"    - training framework: deepspeed {sw.get('deepspeed')}, torch {sw.get('torch')}, "
        f"transformers {sw.get('transformers')}, accelbench {sw.get('accelbench')}",
        f"    - backend: {env['backend']} ({env['backend_plugin']['dist']} {env['backend_plugin']['version']}): "
        f"{env['backend_selection']}",
        "", "- ##### Parallel strategy", "",
        f"    - technique: {ps['technique']}", f"    - implementer: {ps['implementer']}",
        "    - details: " + ", ".join(f"{s}: {z}" for s, z in ps["details"].items()),
        f"    - processes: {ps['nnodes']} node(s) x {ps['nproc_per_node']}",
        "", "- ##### Optimisation strategy", "",
    ]
    lines += [f"    - {o}" for o in result.get("optimizations", [])]
    lines += ["", "- ##### Pre-run changes (made by the backend and recorded, not by hand)", ""]
    adjustments = result.get("adjustments", [])
    lines += [f"    - {i}. [{a['stage']}, {a['by']}] {a['what']}: {a['from']} -> {a['to']}: {a['why']}"
              for i, a in enumerate(adjustments, 1)] or ["    - none"]
    lines += ["", "### Run", "", "* Input batch sizes", ""]
    lines += [
        "  1. local_batchsize (micro_batchsize), LBS: the batch that enters the model per process.",
        "  2. seqlength (max_position_embedding), MPE: the sequence cap (model_max_length); real lengths vary, "
        "and MFU counts each sample's real length.",
        "  3. gradient_accumulate_steps, GAS.",
        "  4. global_batchsize = LBS x GAS x data_parallel_size, GBS (data parallel only, so dp size = world size).",
        "",
    ]
    lines += _table([{"stage": s, **e["batch"]} for s, e in result["stages"].items()])
    first = next(iter(result["stages"].values()))["plan"]
    lines += [
        "", "* General metrics", "",
        "| metric | value | note |", "| --- | --- | --- |",
        "| task | multimodal LLM training | LLaVA-1.5 two stages |",
        f"| model | {result['model']['case']} | {'random weights' if result['model']['random_weights'] else 'pretrained weights'} |",
        f"| dataset | {result['data'].get('name', 'LLaVA-format JSON')} | |",
        f"| precision | {first['dtype']} | |",
        "| hyper-parameter changes | fix_hp, see the performance table | needed to run on this backend |",
        f"| device | {device_label(result)} | |",
        "| device memory | mem, see the performance table | peak reserved / total, GiB per process |",
        "| compute utilisation | MFU, see the performance table | PaLM definition; accounting in docs/metrics.md |",
        "| **throughput** | **token/p/s, see the performance table** | real (non-pad) tokens per process per second, steady state |",
        "| MMMU (val) | acc, see the performance table | MMMU validation accuracy |",
        "", "* Performance", "",
    ]
    lines += _table(performance_rows(result))
    lines += ["", "Steady-state figures exclude the warm-up steps and the steps in which torch.compile made a "
              "graph, counted in result.json (`warmup_steps_excluded`, `compile_steps_excluded`)."]
    return "\n".join(lines) + "\n"

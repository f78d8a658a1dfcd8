"""Device-memory readings through an nvidia-smi-compatible command line (nvidia-smi, ixsmi, ...)."""
from __future__ import annotations

import shutil
import subprocess


def query_smi(exe: str) -> list[tuple[int, int]] | None:
    """(used, total) bytes per device from ``EXE --query-gpu=memory.used,memory.total``; None if absent."""
    path = shutil.which(exe)
    if not path:
        return None
    try:
        out = subprocess.run([path, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_smi_csv(out.stdout)


def parse_smi_csv(text: str) -> list[tuple[int, int]] | None:
    """Parse 'used, total' MiB rows; None when the output is not in that form."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            used, total = float(parts[0]), float(parts[1])
        except (IndexError, ValueError):
            return None
        rows.append((int(used * 2**20), int(total * 2**20)))
    return rows or None

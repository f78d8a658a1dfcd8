import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `accelbench` command line as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "accelbench", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(ROOT))


@pytest.fixture
def cli():
    return run_cli

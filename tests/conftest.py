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


@pytest.fixture
def image_less_rank_data(tmp_path: Path) -> Path:
    """A LLaVA data folder where, at micro-batch 1 on 2 ranks, some step hands one rank a text-only sample and
    the other an image sample (the epoch's leftover megabatch mixes the modalities). Under ZeRO-3 a rank that
    skips the vision tower then leaves the other waiting in its parameter all-gather."""
    import json

    from accelbench.train.data import LengthGroupedSampler
    from accelbench.train.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, n_pretrain=4, n_finetune=24, mmmu=False)
    path = data / "llava_v1_5_mix665k.json"
    records = json.loads(path.read_text())
    records = [r for r in records if r.get("image")][:3] + [r for r in records if not r.get("image")][:1]
    path.write_text(json.dumps(records))
    signs = [1 if r.get("image") else -1 for r in records]
    ranks = [LengthGroupedSampler(signs, batch_size=1, world_size=2, rank=k).rank_batches() for k in (0, 1)]
    assert any(bool(records[a[0]].get("image")) != bool(records[b[0]].get("image")) for a, b in zip(*ranks))
    return data

"""benchmarks/rank_balance.py: the evenness table it prints for lever balanced-ranks."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rank_balance_prints_both_deals_and_the_lever_is_never_less_even(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/rank_balance.py"), "--case", "tiny", "--mbs", "4",
                          "--world", "4", "--epochs", "2", "--data", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[2].strip(): line.split("|")[3:6] for line in out.stdout.splitlines()
            if line.startswith("| 4 |")}
    llava, dealt = rows["LLaVA's order"], rows["by length (balanced-ranks)"]
    assert int(llava[0]) == int(dealt[0]) > 0  # the same steps
    assert 0 < float(llava[1]) <= float(dealt[1]) <= 1  # mean evenness
    assert float(llava[2]) <= float(dealt[2])  # worst step

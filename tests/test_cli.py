"""The CLI as a user runs it: queries, plans for described machines, and one-line errors."""
import json

import pytest


def test_backends_on_this_cpu_machine(cli):
    out = cli("backends")
    assert out.returncode == 0, out.stderr
    lines = {line.split(" ")[0]: line for line in out.stdout.splitlines()}
    assert ": available:" in lines["cpu"]
    assert ": unavailable:" in lines["nvidia"] and "torch.cuda.is_available() is False" in lines["nvidia"]
    assert ": unavailable:" in lines["iluvatar"] and "not a CoreX build" in lines["iluvatar"]


def test_info_says_why_cpu_was_chosen(cli):
    out = cli("info")
    assert out.returncode == 0, out.stderr
    assert "backend: cpu (no accelerator backend is available" in out.stdout
    data = json.loads(cli("info", "--json").stdout)
    assert data["device"]["dist_backend"] == "gloo" and data["precision"]["fp16"] is False
    assert data["attention"]["implementations"][0]["name"] == "sdpa"


def test_plan_iluvatar_bi_v150_finetune(cli):
    args = ("plan", "--case", "llava1.5-13b", "--stage", "finetune", "--backend", "iluvatar",
            "--device-name", "Iluvatar BI-V150", "--device-memory", "32GiB", "--nproc", "16")
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "ENABLE_FLASH_ATTENTION_WITH_IXDNN=0" in out.stdout and "tf32 off" in out.stdout
    plan = json.loads(cli(*args, "--json").stdout)
    assert plan["env"]["ENABLE_FLASH_ATTENTION_WITH_IXDNN"] == "0"
    assert plan["tf32"] is False and plan["LBS"] == 4 and plan["micro_batch_requested"] == 16
    assert plan["zero_stage"] == 3 and plan["dtype"] == "bf16"
    by_what = {a["what"]: a for a in plan["adjustments"]}
    assert by_what["env ENABLE_FLASH_ATTENTION_WITH_IXDNN"]["to"] == "0"
    assert by_what["tf32"]["from"] is True and by_what["tf32"]["to"] is False
    assert by_what["micro_batch"]["from"] == 16 and by_what["micro_batch"]["to"] == 4
    assert all(a["why"] for a in plan["adjustments"])
    # one record per change, never two for the same thing
    assert len(by_what) == len(plan["adjustments"])


@pytest.mark.parametrize("assume,attention", [((), "sdpa"), (("--assume-package", "flash_attn"), "flash_attention_2")])
def test_plan_nvidia_a800(cli, assume, attention):
    out = cli("plan", "--case", "llava1.5-13b", "--stage", "finetune", "--backend", "nvidia",
              "--device-name", "NVIDIA A800-SXM4-80GB", "--device-memory", "80GB", "--nproc", "16", *assume, "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["attn_implementation"] == attention
    assert plan["tf32"] is True and plan["LBS"] == 16
    assert not any(a["what"] == "micro_batch" for a in plan["adjustments"])


@pytest.mark.parametrize("args,needle", [
    (("plan", "--backend", "tpu"), "unknown backend 'tpu'"),
    (("plan", "--device-name", "X", "--device-memory=-3GiB"), "--device-memory '-3GiB'"),
    (("plan", "--device-name", "X", "--device-memory", "0GB"), "--device-memory '0GB'"),
    (("plan", "--device-name", "X", "--device-memory", "lots"), "--device-memory 'lots'"),
    (("plan", "--nproc", "-2"), "--nproc -2"),
    (("plan", "--case", "llava9"), "unknown case/preset 'llava9'"),
    (("info", "--backend", "nvidia"), "backend 'nvidia' is not usable here"),
])
def test_bad_input_is_one_line_without_traceback(cli, args, needle):
    out = cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_mfu_calculator_reproduces_flagperf_table(cli):
    out = cli("mfu", "--flagperf", "--params", "13e9", "--stage", "finetune", "--tokens-per-sec", "249.93",
              "--peak-tflops", "192")
    assert out.returncode == 0 and out.stdout.strip() == "10.15 %"
    out = cli("mfu", "--flagperf", "--params", "13e9", "--stage", "pretrain", "--tokens-per-sec", "620.38",
              "--peak-tflops", "192")
    assert out.stdout.strip() == "8.40 %"


@pytest.mark.parametrize("command", ["run", "report", "compare", "import-flagperf", "data", "eval"])
def test_every_command_is_registered(cli, command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: accelbench" in out.stdout

"""Backend detection on described machines: torch version strings, device names, environment."""
import pytest

from accelbench.backends import load_registry
from accelbench.errors import BackendError
from accelbench.machine import MachineFacts, describe_machine

GIB = 2**30


def machine(torch_version, names=(), cap=(8, 0), cuda=True, hip=None, cuda_version="12.4", **kw):
    return MachineFacts(torch_version=torch_version, cuda_available=cuda, cuda_version=cuda_version,
                        hip_version=hip, device_names=tuple(names), device_memory=(80 * GIB,) * len(names),
                        capabilities=(cap,) * len(names), **kw)


def statuses(m):
    reg = load_registry(machine=m)
    return {s.name: s for s in reg.statuses()}, reg


def test_corex_torch_is_iluvatar_not_nvidia():
    st, reg = statuses(machine("2.1.0+corex.4.1.2", ["Iluvatar BI-V150"], cuda_version="10.2"))
    assert st["iluvatar"].available
    assert not st["nvidia"].available and "CoreX" in st["nvidia"].reason
    assert reg.select().name == "iluvatar"


def test_iluvatar_device_name_alone_is_enough():
    st, _ = statuses(machine("2.1.0", ["Iluvatar BI-V100"]))
    assert st["iluvatar"].available and not st["nvidia"].available


def test_compute_capability_80_alone_is_not_iluvatar():
    st, reg = statuses(machine("2.4.0+cu124", ["NVIDIA A100-SXM4-80GB"], cap=(8, 0)))
    assert not st["iluvatar"].available and st["nvidia"].available
    assert reg.select().name == "nvidia"


def test_corex_paths_without_device_do_not_make_iluvatar_available():
    st, _ = statuses(machine("2.4.0", [], cuda=False, paths=frozenset({"/usr/local/corex"}),
                             tools=frozenset({"ixsmi"})))
    assert not st["iluvatar"].available and "/usr/local/corex" in st["iluvatar"].reason


def test_rocm_is_not_nvidia():
    st, _ = statuses(machine("2.4.0+rocm6.1", ["AMD Instinct MI300X"], hip="6.1"))
    assert not st["nvidia"].available and "ROCm" in st["nvidia"].reason


def test_cpu_build_falls_back_to_cpu_and_says_why():
    st, reg = statuses(machine("2.13.0+cpu", [], cuda=False, cuda_version=None))
    assert not st["nvidia"].available and "CPU build" in st["nvidia"].reason
    chosen = reg.select()
    assert chosen.name == "cpu"
    assert "no accelerator backend is available" in chosen.why and "nvidia" in chosen.why


def test_explicit_unavailable_backend_fails_loudly_with_every_status():
    _, reg = statuses(machine("2.13.0+cpu", [], cuda=False))
    with pytest.raises(BackendError) as err:
        reg.select("nvidia")
    msg = str(err.value)
    assert "nvidia" in msg and "iluvatar" in msg and "cpu" in msg


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("ACCELBENCH_BACKEND", "cpu")
    _, reg = statuses(machine("2.4.0+cu124", ["NVIDIA H200"], cap=(9, 0)))
    assert reg.select().name == "cpu"


def test_unknown_backend_names_the_choices():
    _, reg = statuses(machine("2.13.0+cpu", [], cuda=False))
    with pytest.raises(BackendError, match="unknown backend 'tpu'.*cpu"):
        reg.select("tpu")


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA A800-SXM4-80GB", "bf16", 312),
    ("NVIDIA A100-PCIE-40GB", "bf16", 312), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H200 NVL", "bf16", 835),
])
def test_nvidia_peak_table(name, dtype, tflops):
    _, reg = statuses(machine("2.4.0+cu124", [name], cap=(9, 0)))
    peak = reg.select("nvidia").device_info().peak(dtype)
    assert peak.flops == pytest.approx(tflops * 1e12)


def test_nvidia_device_info_names_the_nccl_torch_runs(monkeypatch):
    import torch

    _, reg = statuses(machine("2.4.0+cu124", ["NVIDIA H200"], cap=(9, 0)))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    assert reg.select("nvidia").device_info().versions["nccl"] == "2.27.3"

    def without_nccl():
        raise AttributeError("module 'torch._C' has no attribute '_nccl_version'")  # a CPU build of torch

    monkeypatch.setattr(torch.cuda.nccl, "version", without_nccl)
    assert reg.select("nvidia").device_info().versions["nccl"] == "unknown"


def test_unknown_nvidia_device_has_unknown_peak():
    _, reg = statuses(machine("2.4.0+cu124", ["NVIDIA GeForce GTX 1080"], cap=(6, 1)))
    info = reg.select("nvidia").device_info()
    assert info.peak("bf16").flops is None and "unknown" in info.peak("bf16").source


def test_nvidia_capabilities_by_architecture():
    _, reg = statuses(machine("2.4.0+cu124", ["NVIDIA A100-SXM4-80GB"], cap=(8, 0),
                              packages=frozenset({"flash_attn"})))
    b = reg.select("nvidia")
    assert b.attention().preferred.name == "flash_attention_2" and b.attention().preferred.varlen
    assert b.precision().tf32 and b.precision().default_dtype == "bf16"
    _, reg = statuses(machine("2.4.0+cu124", ["Tesla V100-SXM2-32GB"], cap=(7, 0)))
    b = reg.select("nvidia")
    assert b.attention().preferred.name == "sdpa"
    assert not b.precision().bf16 and b.precision().default_dtype == "fp16" and not b.precision().tf32


def test_iluvatar_capabilities_and_per_chip_peak():
    _, reg = statuses(machine("2.1.0+corex.4.1.2", ["Iluvatar BI-V150"] * 2, cuda_version="10.2"))
    b = reg.select()
    info = b.device_info()
    assert info.chips_per_board == 2
    peak = info.peak("bf16")
    assert peak.flops == pytest.approx(96e12) and peak.basis == "per chip" and "192" in peak.source
    att = b.attention().preferred
    assert att.name == "flash_attention_2" and att.env == {"ENABLE_FLASH_ATTENTION_WITH_IXDNN": "0"}
    assert b.precision().tf32 is False and b.precision().tf32_policy == "off"
    env = {}
    adjustments = b.setup_env(env)
    assert env["ENABLE_FLASH_ATTENTION_WITH_IXDNN"] == "0"
    assert len(adjustments) == 1 and "unpadded" in adjustments[0].why


def test_capability_records_are_frozen_and_serialise():
    _, reg = statuses(machine("2.4.0+cu124", ["NVIDIA H200"], cap=(9, 0)))
    caps = reg.select().capabilities()
    assert caps["device"]["device_count"] == 1 and caps["device"]["dist_backend"] == "nccl"
    info = reg.select().device_info()
    with pytest.raises(AttributeError):
        info.vendor = "x"  # type: ignore[misc]


def test_described_machine_guesses_capability():
    m = describe_machine("NVIDIA A800-SXM4-80GB", 80 * GIB, packages=frozenset())
    assert m.capabilities == ((8, 0),) and m.described


@pytest.mark.parametrize("name,cap", [("Iluvatar BI-V100", (8, 0)), ("Tesla V100-SXM2-32GB", (7, 0)),
                                      ("NVIDIA H200", (9, 0))])
def test_described_capability_guess_by_name(name, cap):
    assert describe_machine(name, 32 * GIB, packages=frozenset()).capabilities == (cap,)

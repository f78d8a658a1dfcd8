"""Third-party plugin distributions: built, pip-installed, listed, selectable; broken ones isolated."""
import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

GOOD = '''
from accelbench.capabilities import (AttentionCapability, AttentionImpl, Availability, BackendSpec, DeviceInfo,
                                     PrecisionCapability)
from accelbench.hookspecs import hookimpl

@hookimpl
def accelbench_register_backends(register):
    register(BackendSpec("fakeaccel", priority=50, description="a test accelerator"))

@hookimpl
def accelbench_probe(backend, machine):
    return Availability(True, "fake accelerator always present") if backend == "fakeaccel" else None

@hookimpl
def accelbench_device_info(backend, machine):
    if backend == "fakeaccel":
        return DeviceInfo("FakeVendor", ("Fake-1",), "cpu", (8 * 2**30,), "cpu", "gloo")

@hookimpl
def accelbench_attention(backend, machine):
    if backend == "fakeaccel":
        return AttentionCapability((AttentionImpl("sdpa", False),))

@hookimpl
def accelbench_precision(backend, machine):
    if backend == "fakeaccel":
        return PrecisionCapability(True, False, False, "bf16", "unsupported")
'''
BROKEN = "raise ImportError('vendor SDK libfoo.so not found')\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(tmp: Path, dist: str, module: str, source: str, ep_name: str) -> Path:
    """A minimal, valid wheel (PEP 427) with one module and an accelbench.backends entry point."""
    info = f"{dist}-0.0.1.dist-info"
    files = {
        f"{module}.py": source.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: accelbench-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[accelbench.backends]\n{ep_name} = {module}\n".encode(),
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = tmp / f"{dist}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheels")
    good = build_wheel(tmp, "accelbench_fakeaccel", "accelbench_fakeaccel", GOOD, "fakeaccel")
    bad = build_wheel(tmp, "accelbench_brokenvendor", "accelbench_brokenvendor", BROKEN, "brokenvendor")
    pip("install", "--no-deps", "--no-index", str(good), str(bad))
    yield
    pip("uninstall", "-y", "accelbench_fakeaccel", "accelbench_brokenvendor")


def test_third_party_plugin_listed_selected_and_broken_one_isolated(installed_plugins, cli):
    out = cli("backends", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["fakeaccel"]["available"] and backends["fakeaccel"]["dist"] == "accelbench_fakeaccel"
    assert backends["cpu"]["available"]  # everything else keeps working
    assert "nvidia" in backends and "iluvatar" in backends
    broken = {p["name"]: p for p in data["broken_plugins"]}
    assert "libfoo.so" in broken["brokenvendor"]["error"]

    text = cli("backends")
    assert "brokenvendor" in text.stdout and "broken" in text.stdout

    # the accelerator plugin outranks cpu in automatic selection, and can be chosen by name
    info = json.loads(cli("info", "--json").stdout)
    assert info["backend"] == "fakeaccel" and info["device"]["vendor"] == "FakeVendor"
    info = json.loads(cli("info", "--json", env={"ACCELBENCH_BACKEND": "cpu"}).stdout)
    assert info["backend"] == "cpu"


def test_plugin_allow_list_env(installed_plugins, cli):
    data = json.loads(cli("backends", "--json", env={"ACCELBENCH_PLUGINS": "nvidia"}).stdout)
    names = {b["name"] for b in data["backends"]}
    assert names == {"cpu", "nvidia"} and not data["broken_plugins"]


def test_plugin_raising_in_a_hook_is_reported_broken():
    import types

    from accelbench.backends import load_registry
    from accelbench.capabilities import BackendSpec
    from accelbench.hookspecs import hookimpl

    mod = types.ModuleType("raising_plugin")

    @hookimpl
    def accelbench_register_backends(register):
        register(BackendSpec("raiser", priority=500))

    @hookimpl
    def accelbench_probe(backend, machine):
        if backend == "raiser":
            raise RuntimeError("probe exploded")

    mod.accelbench_register_backends = accelbench_register_backends
    mod.accelbench_probe = accelbench_probe
    reg = load_registry(entry_points=False, extra_plugins=[("raising_plugin", mod)])
    st = {s.name: s for s in reg.statuses()}
    assert st["raiser"].broken and "probe exploded" in st["raiser"].error
    assert st["cpu"].available
    assert reg.select().name == "cpu"  # the broken one is skipped, not fatal

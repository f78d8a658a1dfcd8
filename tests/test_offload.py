"""Lever "offload-activations" (train/offload.py): a decoder layer whose saved tensors wait in host memory trains the
same model, bit for bit, eager or compiled; its weights and the inputs it shares with other layers never leave the
device; the copies back start before the backward needs them; the pinned memory is reused from one micro-batch
to the next. On a CPU device the "host" copies are plain copies, and so exercise everything but the streams."""
import pytest
import torch

from accelbench.memory import OFFLOAD_LOOKAHEAD, offloaded_positions
from accelbench.train.offload import ActivationOffload, _Arena

IMAGE_TOKEN = 1000


def _model(kernels: str) -> torch.nn.Module:
    from accelbench.cases import get_preset
    from accelbench.train.kernels import compile_layers
    from accelbench.train.model import build_model, enable_checkpointing, freeze_for_stage

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), image_token_id=IMAGE_TOKEN, pad_token_id=0, dtype="bf16",
                        attn_implementation="sdpa", device=torch.device("cpu"))
    freeze_for_stage(model, "finetune")
    enable_checkpointing(model, 0)
    compile_layers(model, kernels)
    return model


def _step(model: torch.nn.Module, seed: int, offload: ActivationOffload | None = None,
          layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One forward and backward; the loss, the trained weights' gradients, and what was on the host after the
    forward."""
    from accelbench.train.objective import LlavaObjective

    ids = torch.randint(1, IMAGE_TOKEN - 1, (2, 64), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :10] = -100
    if offload is not None:
        offload.set_layers(layers)
    model.zero_grad(set_to_none=True)
    loss = LlavaObjective(model)(input_ids=ids, labels=labels)
    on_host = [e.host.clone() for group in (offload.groups.values() if offload else ()) for e in group]
    loss.backward()
    trained = [*model.model.language_model.parameters(), *model.lm_head.parameters()]  # no image: no projector
    return loss.detach(), [p.grad.clone() for p in trained], on_host


@pytest.mark.parametrize("kernels", ["hf", "inductor"])
def test_offloaded_layer_trains_bit_for_bit(kernels):
    seeds = (1, 2, 3)
    reference = _model(kernels)
    expected = [_step(reference, seed) for seed in seeds]
    model = _model(kernels)
    # every saved tensor of the tiny model qualifies; no size hint: the pinned memory grows in the first micro-batch
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1)
    offload.attach(model.model.language_model.layers)
    memory = []
    for (loss, grads, _), seed in zip(expected, seeds):
        offload.reset_counts()
        got_loss, got_grads, on_host = _step(model, seed, offload, (0,))
        assert torch.equal(got_loss, loss) and all(torch.equal(a, b) for a, b in zip(got_grads, grads))
        assert offload.bytes_offloaded > 0 and on_host and offload.late == 0  # layer 1's backward fetched them
        weights = [p.detach() for p in model.parameters()]
        assert not any(h.shape == w.shape and torch.equal(h, w) for h in on_host for w in weights)
        (arena,) = offload.arenas
        memory.append(arena.memory)
    # the second micro-batch starts in memory that holds a whole one, and the third (no larger) reuses it
    assert memory[1].numel() >= offload.bytes_offloaded and memory[2] is memory[1]


def test_a_layer_no_backward_reaches_first_is_fetched_late_and_still_exact():
    reference = _model("hf")
    loss, grads, _ = _step(reference, 1)
    model = _model("hf")
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1)
    offload.attach(model.model.language_model.layers)
    got_loss, got_grads, on_host = _step(model, 1, offload, (1,))  # the top layer: nothing above it starts the copy
    assert torch.equal(got_loss, loss) and all(torch.equal(a, b) for a, b in zip(got_grads, grads))
    assert offload.late == len(on_host) > 0


def test_without_offloaded_layers_the_hooks_stay_out():
    model = _model("hf")
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1)
    offload.attach(model.model.language_model.layers)
    _step(model, 1, offload, ())
    assert offload.bytes_offloaded == 0 and offload.groups == {} and offload.arenas == []


def test_arena_keeps_strides_grows_with_room_and_is_reused():
    arena = _Arena(1024, pin=False)
    a = torch.arange(600, dtype=torch.float32).reshape(20, 30).t()  # not contiguous
    host = arena.take_like(a)
    assert host.stride() == a.stride() and host.shape == a.shape
    host.copy_(a)
    assert torch.equal(host, a)
    assert arena.memory.numel() == int(2560 * _Arena.GROWTH)  # 2400 bytes did not fit 1024: grown, with room
    first = arena.memory
    arena.reset()
    b = arena.take_like(torch.ones(300, dtype=torch.bfloat16))
    c = arena.take_like(torch.ones(10, dtype=torch.float32))
    assert arena.memory is first  # no larger than before: the same memory
    assert b.untyped_storage().data_ptr() == first.data_ptr()
    assert c.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one buffer, views into it
    assert c.storage_offset() * 4 % _Arena.ALIGN == 0  # aligned past b


def test_offloaded_positions_spread_over_the_kept_layers_below_the_top():
    assert offloaded_positions(32, 15, 8) == [15, 16, 18, 20, 22, 24, 26, 28]
    assert offloaded_positions(40, 0, 4) == [0, 9, 19, 28]
    top = 32 - OFFLOAD_LOOKAHEAD
    assert all(15 <= i < top for i in offloaded_positions(32, 15, 30))
    assert len(offloaded_positions(32, 15, 30)) == top - 15  # no more than there are kept layers below the top
    assert offloaded_positions(32, 31, 4) == [] and offloaded_positions(32, 0, 0) == []


def test_nvidia_host_link_is_read_from_nvml_and_shared_behind_a_switch(monkeypatch):
    import dataclasses
    import sys
    import types

    from accelbench.backends import load_registry
    from accelbench.machine import describe_machine

    levels = {1: 10, 2: 40, 3: 20}  # device 1 behind device 0's switch, 2 on another CPU, 3 behind a switch above
    fake = types.SimpleNamespace(
        NVML_TOPOLOGY_MULTIPLE=20, nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetTopologyCommonAncestor=lambda a, b: levels[b],
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 4, nvmlDeviceGetMaxPcieLinkWidth=lambda h: 16)
    probed = dataclasses.replace(describe_machine("NVIDIA H200", 140 << 30, count=4, packages=frozenset()),
                                 described=False)
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))
    for name, value in vars(fake).items():
        setattr(sys.modules["pynvml"], name, value)
    lane = 1.969e9  # PCIe 4, as NVML says here, not the datasheet's 5
    assert load_registry(machine=probed).select("nvidia").host_link() == pytest.approx(0.8 * 16 * lane / 3)
    levels.update({1: 50, 3: 30})  # every other device beyond the host bridge: the uplink is device 0's own
    assert load_registry(machine=probed).select("nvidia").host_link() == pytest.approx(0.8 * 16 * lane)

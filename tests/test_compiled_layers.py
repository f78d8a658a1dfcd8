"""Compiled decoder layers (kernel set "inductor") train the same model as eager ones: under ZeRO-3 with each
decoder layer as a fetch unit (ds_config.COMPILED_LAYERS), over two gloo ranks, on packed micro-batches whose
replayed layers change from step to step and from rank to rank (lever "batch-recompute", chosen by each
micro-batch's size as the trainer does), the per-step losses and gradient norms equal the eager run's bit for bit
in bf16.

Each run is a child process (torch.distributed.run) so DeepSpeed's and dynamo's globals never leak into pytest.
"""
import json
import os
import subprocess
import sys

import pytest

STEPS, IMAGE_TOKEN = 3, 1000
LENGTHS = ((30, 22), (41, 17), (25, 36))  # two samples per rank and step: the CPU varlen path loops over them
# rank r's samples are 3·r tokens longer, and even steps carry the tiny model's 32 image tokens: the micro-batches
# hold 84/90, 58/64 and 93/99 tokens (rank 0/1), so this table replays 0, 0, 2 layers on rank 0 and 1, 0, 2 on rank 1
TABLE = [[84, 0], [90, 1], [1000, 2]]


def _child(kernels: str, out: str, dtype: str = "fp32", zero: str = "units", linears: str = "zero3") -> None:
    """One run. ``kernels`` "inductor+offload": compiled layers, the first layer each micro-batch keeps offloaded to
    the "host" (lever offload-activations; on CPU a copy); "+tower": the vision tower kept whole on both ranks (lever
    whole-tower). ``zero``: "units" (each decoder layer a fetch unit, torch's linear: ds_config.COMPILED_LAYERS) or
    "default" (DeepSpeed's, the peer's; then every micro-batch replays 2 layers, since ZeRO-3 must see the same
    modules on every rank); ``linears``: "zero3" (the trainer's choice for "units") or "torch"."""
    import deepspeed
    import torch
    from deepspeed.accelerator import set_accelerator

    from accelbench.backends import load_registry

    set_accelerator(load_registry().select("cpu").deepspeed_accelerator())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    from accelbench.cases import get_preset
    from accelbench.train.ds_config import deepspeed_config, tuned_overrides
    from accelbench.train.kernels import compile_counters, compile_layers, linears_as_under_zero3_default
    from accelbench.train.model import build_model, enable_checkpointing, freeze_for_stage
    from types import SimpleNamespace

    from accelbench.train.model import replay_first_layers
    from accelbench.train.objective import LlavaObjective
    from accelbench.train.packing import collate_packed
    from accelbench.train.stage import StageRunner, model_inputs
    from accelbench.train.varlen_attention import register
    from accelbench.memory import tower_threshold

    preset = get_preset("tiny")
    threshold = tower_threshold(preset) if kernels.endswith("+tower") else None
    kernels = kernels.removesuffix("+tower")
    config = deepspeed_config(zero_stage=3, micro_batch=2, grad_accum=1, world_size=2, dtype=dtype,
                              hidden_size=preset.llm.hidden,
                              overrides=tuned_overrides(False, None, compiled_layers=zero == "units",
                                                        tower_threshold=threshold))
    torch.manual_seed(0)
    model = build_model(preset, image_token_id=IMAGE_TOKEN, pad_token_id=0, dtype=dtype, attn_implementation=register(),
                        device=torch.device("cpu"), zero3_config=config)
    trainable = freeze_for_stage(model, "finetune")
    enable_checkpointing(model, 2)
    offload = None
    if kernels.endswith("+offload"):
        from accelbench.train.offload import ActivationOffload

        kernels = kernels.removesuffix("+offload")
        offload = ActivationOffload(torch.device("cpu"), min_bytes=1)  # every saved tensor of the tiny model
    compiled = compile_layers(model, kernels)
    if offload is not None:
        offload.attach(model.model.language_model.layers)
    if linears == "zero3":  # as the trainer does
        linears_as_under_zero3_default(model, config)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    engine, _, _, _ = deepspeed.initialize(model=LlavaObjective(model, uniform_calls=True, lm_head_calls=1),
                                           optimizer=optimizer, config=config)
    engine.train()

    def sample(n: int, length: int) -> dict:
        g = torch.Generator().manual_seed(100 * n + length + rank)
        ids = torch.randint(1, IMAGE_TOKEN - 1, (length,), generator=g)
        labels = ids.clone()
        if n % 2:  # text only: the vision tower runs on a blank image
            return {"id": str(n), "input_ids": ids, "labels": labels, "pixel_values": None}
        image = torch.full((preset.vision.image_tokens,), IMAGE_TOKEN)
        size = preset.vision.image_size
        return {"id": str(n), "input_ids": torch.cat([ids[:1], image, ids[1:]]),
                "labels": torch.cat([labels[:1], torch.full_like(image, -100), labels[1:]]),
                "pixel_values": torch.randn(3, size, size, generator=g)}

    # what StageRunner._replays reads
    table = TABLE if zero == "units" else [[1000, 2]]
    stage = SimpleNamespace(plan={"gradient_checkpointing": True, "recompute_layers": 2, "recompute_table": table},
                            preset=preset)
    steps, replays, offloaded = [], [], []
    for n, lengths in enumerate(LENGTHS):
        batch = collate_packed([sample(n, length + 3 * rank) for length in lengths], pad_token_id=0,
                               image_token_id=IMAGE_TOKEN)
        (k,) = StageRunner._replays(stage, [batch])
        replay_first_layers(model, k)
        replays.append([batch["padded_tokens"], k])
        if offload is not None:  # the first kept layer: fetched ahead below the top, late as the top layer itself
            offload.reset_counts()
            offload.set_layers([k] if k < preset.llm.layers else [])
        loss = engine(**model_inputs(batch, torch.device("cpu"), model.dtype))
        engine.backward(loss)
        engine.step()
        steps.append([loss.item(), float(engine.get_global_grad_norm())])
        if offload is not None:
            offloaded.append([offload.bytes_offloaded, offload.late])
    # which tensors ZeRO-3 keeps whole on every rank, by component
    persist = {name: sorted({p.ds_persist for p in module.parameters() if len(p.ds_shape) == 2})
               for name, module in (("tower", model.model.vision_tower), ("decoder", model.model.language_model))}
    with open(f"{out}.{rank}", "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "replays": replays, "compiled": compiled, "counters": compile_counters(),
                   "offloaded": offloaded, "persist": persist}, f)
    # gloo's threads stopped here rather than in the interpreter's teardown, torch's advice; and then no teardown at
    # all: after this rank's results were written, about one run in five still aborted in the interpreter's exit
    # ("terminate called without an active exception", no Python frame left) on a 2-core machine
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(kernels: str, tmp_path, dtype: str = "bf16") -> dict:
    out = tmp_path / f"{kernels}.json"
    # Inductor's own cache in the test's folder: nothing shared with other runs on the machine, nothing stale
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    # --standalone: the launcher picks a free port itself, so concurrent runs never race for one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, kernels,
           str(out), dtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"{kernels}.json.{rank}").read_text()) for rank in (0, 1)]
    return {**ranks[0], "replays": [r["replays"] for r in ranks], "offloaded": [r["offloaded"] for r in ranks]}


def _record(step: int, time_s: float, compiled: bool = False):
    from accelbench.train.metrics import StepRecord

    return StepRecord(stage="finetune", step=step, time_s=time_s, real_tokens=1000, padded_tokens=1000, samples=4,
                      loss=2.0, lr=1e-3, grad_norm=1.0, model_flops=1e12, hardware_flops=1e12, mem_allocated=1,
                      mem_reserved=1, rss=1, tokens_per_s_per_proc=1000 / time_s, compiled=compiled)


def test_a_step_that_compiled_is_left_out_of_the_steady_state():
    from accelbench.report.plots import steps_by_stage
    from accelbench.train.metrics import summarize

    # step 1 is warm-up; step 4 made a graph for a new shape (a one-off 10 s)
    records = [_record(1, 80.0, True), _record(2, 2.0), _record(3, 2.0), _record(4, 10.0, True), _record(5, 2.0)]
    out = summarize(records, world_size=1, stage_wall_s=100.0, peak_flops=1e15, chips_per_board=1,
                    flagperf_params=1e9, stage="finetune", device_total=1)
    assert (out["warmup_steps_excluded"], out["compile_steps_excluded"], out["steady_steps"]) == (1, 1, 3)
    assert out["tokens_per_s_per_proc"] == pytest.approx(500.0)  # 3000 tokens in 6 s
    # a compiling step's gc_s holds the full collection after its compile, outside its clock: not a stall
    records[0].gc_s, records[3].gc_s, records[4].gc_s = 0.9, 0.5, 0.003
    gc_max = summarize(records, world_size=1, stage_wall_s=100.0, peak_flops=None, chips_per_board=1,
                       flagperf_params=1e9, stage="finetune", device_total=1)["gc_s_max"]
    assert gc_max == 0.003
    flags = [e["warmup"] for e in steps_by_stage([r.to_dict() for r in records])["finetune"]]
    assert flags == [True, False, False, True, False]  # the plots draw it with the warm-up steps
    # every step after warm-up compiling: they are all there is to measure, so they stay steady and none is excluded
    every = [_record(1, 9.0, True), _record(2, 4.0, True), _record(3, 4.0, True)]
    out = summarize(every, world_size=1, stage_wall_s=20.0, peak_flops=None, chips_per_board=1, flagperf_params=1e9,
                    stage="finetune", device_total=1)
    assert (out["steady_steps"], out["compile_steps_excluded"]) == (2, 0)
    result = {"stages": {"finetune": {"metrics": out}}}
    flags = [e["warmup"] for e in steps_by_stage([r.to_dict() for r in every], result)["finetune"]]
    assert flags == [True, False, False]  # the plots follow the summary


@pytest.mark.slow
def test_compiled_layers_train_like_eager_under_zero3(tmp_path):
    eager, compiled = _run("hf", tmp_path), _run("inductor", tmp_path)
    assert eager["compiled"] == 0 and eager["counters"]["graphs"] == 0
    # the layers did run compiled: 2 decoder layers, a replayed and a kept variant at least (CPU attention adds
    # graph breaks); the vision encoder layers stay eager
    assert compiled["compiled"] == 2 and compiled["counters"]["graphs"] >= 2
    assert len({round(loss, 4) for loss, _ in eager["steps"]}) > 1  # it trains: the comparison is not vacuous
    # each rank replays what its own micro-batch needs: at step 1 the two ranks replay different layers, and ZeRO-3,
    # which fetches each decoder layer as one unit, never sees it
    for run in (eager, compiled):
        rank0, rank1 = run["replays"]
        assert rank0 == [[84, 0], [58, 0], [93, 2]] and rank1 == [[90, 1], [64, 0], [99, 2]]
    # Inductor rounds as eager does (emulate_precision_casts), so the two compute the same bits
    assert compiled["steps"] == eager["steps"]
    # and a layer whose saved tensors wait on the "host" (lever offload-activations) under ZeRO-3, which gathers and
    # releases its weights around it, changes no bit either: fetched ahead (layer 0, below layer 1) or late (layer 1)
    offloaded = _run("inductor+offload", tmp_path)
    assert offloaded["steps"] == eager["steps"]
    for rank, replays in zip(offloaded["offloaded"], compiled["replays"]):
        for (moved, late), (_, k) in zip(rank, replays):
            assert (moved > 0, late > 0) == ((k < 2), (k == 1))
    # the vision tower kept whole on both ranks (lever whole-tower) gathers nothing and changes no bit
    whole = _run("inductor+tower", tmp_path)
    # (LLaVA's threshold, 10·hidden, keeps the tiny tower's position embedding whole, none of its linear weights)
    assert compiled["persist"] == {"tower": [False, True], "decoder": [False]}
    assert whole["persist"] == {"tower": [True], "decoder": [False]}
    assert whole["steps"] == eager["steps"]


def test_projector_and_tower_linears_add_the_bias_as_zero3_does():
    """Under ZeRO-3 without memory_efficient_linear (compiled layers), the vision tower's and the projector's linear
    layers still compute as DeepSpeed's default ZeRO-3 linear, the peer's: the matmul, then the bias added in a
    second bf16 rounding. torch's own linear rounds once, so a bias under half a unit of the last place moves some
    of its outputs and none of the peer's; on CPU in bf16 this alone moved the whole 2-rank trainer's loss at the
    first step with images after the projector's biases had trained (docs/performance.md, "Loss curves")."""
    import torch
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from transformers import LlavaForConditionalGeneration

    from accelbench.cases import get_preset
    from accelbench.train.kernels import linears_as_under_zero3_default

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(preset.llava_config(image_token_id=IMAGE_TOKEN),
                                                       attn_implementation="sdpa", dtype=torch.bfloat16)
    linear = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        linear.bias.fill_(1e-3)  # a trained bias, well under the outputs' half-ulp
    features = torch.randn(2, preset.vision.image_tokens, linear.in_features, dtype=torch.bfloat16)
    torch_out, zero3_out = torch.nn.functional.linear(features, linear.weight, linear.bias), \
        zero3_linear_wrap(features, linear.weight, linear.bias)
    assert not torch.equal(torch_out, zero3_out)  # the two roundings differ here: the check below can fail
    # only where the ZeRO-3 config leaves torch's linear in place; by default ZeRO-3 replaces it everywhere itself
    assert linears_as_under_zero3_default(model, None) == 0
    assert linears_as_under_zero3_default(model, {"zero_optimization": {"stage": 3}}) == 0
    assert torch.equal(linear(features), torch_out)
    clip_linears = sum(isinstance(m, torch.nn.Linear) for m in model.model.vision_tower.modules())
    units = {"zero_optimization": {"stage": 3, "memory_efficient_linear": False}}
    assert linears_as_under_zero3_default(model, units) == clip_linears + 2  # the tower's and the projector's two
    # the frozen tower's linears: the same arithmetic, without the autograd.Function (2-D input takes addmm)
    fc1 = model.model.vision_tower.encoder.layers[0].mlp.fc1
    with torch.no_grad():
        fc1.bias.fill_(1e-3)
        for shape in ((2, preset.vision.image_tokens, fc1.in_features), (7, fc1.in_features)):
            x = torch.randn(*shape, dtype=torch.bfloat16)
            assert torch.equal(fc1(x), zero3_linear_wrap(x, fc1.weight, fc1.bias))
    out = linear(features.requires_grad_(True))
    assert torch.equal(out, zero3_out)
    out.float().sum().backward()  # and the projector still trains
    assert linear.weight.grad is not None and linear.bias.grad is not None and features.grad is not None


def test_image_features_are_the_eager_ones_bit_for_bit():
    """The frozen tower runs without autograd and eager under compiled layers: in bf16 its image features equal
    those of transformers' own forward with autograd, bit for bit (compiled, Inductor's fused fp32 intermediates
    moved them 0.6 % and the GPU loss curve with them)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from accelbench.cases import get_preset
    from accelbench.train.kernels import compile_layers
    from accelbench.train.model import enable_checkpointing, freeze_for_stage

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(preset.llava_config(image_token_id=IMAGE_TOKEN),
                                                       attn_implementation="sdpa", dtype=torch.bfloat16)
    model.train()
    pixels = torch.randn(4, 3, preset.vision.image_size, preset.vision.image_size, dtype=torch.bfloat16)

    def features():
        cfg = model.config
        out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))

    enable_checkpointing(model)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    reference = features()  # transformers' own: gradients reach the tower through enable_input_require_grads
    assert reference.requires_grad
    freeze_for_stage(model, "finetune")
    assert compile_layers(model, "inductor") == preset.llm.layers
    ours = features()
    assert torch.equal(ours, reference)


def test_compiled_layers_give_eagers_loss_and_gradients_bit_for_bit_kept_or_replayed():
    """In bf16, the compiled decoder layers compute eager's numbers: Inductor rounds to bf16 wherever eager does
    (``emulate_precision_casts``; with its default fp32 intermediates no gradient matched). Replaying them in
    backward changes no bit either: lever batch-recompute, which changes the replay count per micro-batch, changes
    only memory and time. Nor does recomputing the element-wise results in the backward instead of saving them
    (lever elementwise-recompute)."""
    import torch

    from accelbench.cases import get_preset
    from accelbench.train.kernels import compile_layers
    from accelbench.train.model import build_model, enable_checkpointing, freeze_for_stage, replay_first_layers
    from accelbench.train.objective import LlavaObjective

    preset = get_preset("tiny")

    def model(kernels: str, elementwise_recompute: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        built = build_model(preset, image_token_id=IMAGE_TOKEN, pad_token_id=0, dtype="bf16",
                            attn_implementation="sdpa", device=torch.device("cpu"))
        freeze_for_stage(built, "finetune")
        enable_checkpointing(built, 0)
        compiled = compile_layers(built, kernels, elementwise_recompute)
        assert compiled == (preset.llm.layers if kernels == "inductor" else 0)
        return built

    ids = torch.randint(1, IMAGE_TOKEN - 1, (2, 64), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100

    def loss_and_grads(net: torch.nn.Module, replayed: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        replay_first_layers(net, replayed)
        net.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = LlavaObjective(net)(input_ids=ids, labels=labels)
        loss.backward()
        trained = [*net.model.language_model.parameters(), *net.lm_head.parameters()]  # no image: no projector
        return loss.detach(), [p.grad for p in trained], saved[0]

    eager_loss, eager, _ = loss_and_grads(model("hf"), 0)
    compiled = model("inductor")
    kept_loss, kept, kept_saved = loss_and_grads(compiled, 0)
    replayed_loss, replayed, replayed_saved = loss_and_grads(compiled, preset.llm.layers)
    assert replayed_saved < kept_saved / 2  # the layers did replay: their activations were not kept
    assert len(eager) == len(kept) == len(replayed) > 0 and all(g is not None for g in kept)
    assert torch.equal(kept_loss, eager_loss) and torch.equal(replayed_loss, eager_loss)
    assert all(torch.equal(a, b) for a, b in zip(kept, eager))
    assert all(torch.equal(a, b) for a, b in zip(replayed, kept))
    try:
        lean_loss, lean, lean_saved = loss_and_grads(model("inductor", elementwise_recompute=True), 0)
    finally:
        import torch._functorch.config

        torch._functorch.config.aggressive_recomputation = False  # process-wide: leave the suite as it was
    assert replayed_saved < lean_saved < kept_saved  # it saved less, and still more than a replayed layer
    assert torch.equal(lean_loss, eager_loss) and all(torch.equal(a, b) for a, b in zip(lean, eager))


if __name__ == "__main__":
    _child(*sys.argv[1:])  # kernels, output path[, dtype, zero, linears]: by hand in docs/performance.md

"""Build the LLaVA-1.5 model for a stage: random weights of a preset's shapes, or local HF folders."""
from __future__ import annotations

import glob
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cases import ModelPreset
from ..errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RANDOM_WEIGHTS_NOTE = "random weights: throughput and memory only; loss and MMMU not meaningful"


@dataclass(frozen=True)
class WeightPaths:
    llm: str | None = None  # HF Llama/Vicuna folder
    vision_tower: str | None = None  # HF CLIPVisionModel folder
    projector: str | None = None  # a projector file (safetensors, or a tensor-only torch file)

    @property
    def random(self) -> bool:
        return self.llm is None and self.vision_tower is None

    def check(self) -> None:
        """Refuse missing folders before any heavy import or model build."""
        for option, path in (("--llm", self.llm), ("--vision-tower", self.vision_tower)):
            if path is not None and not Path(path, "config.json").is_file():
                raise ConfigError(f"{option} {path!r} is not a Hugging Face model folder (no config.json there)")
        if self.projector is not None and not Path(self.projector).exists():
            raise ConfigError(f"--projector {self.projector!r} does not exist")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a file or folder: safetensors, or torch files read with weights_only (never unpickled)."""
    from safetensors.torch import load_file

    p = Path(path)
    files = [p] if p.is_file() else sorted(Path(f) for f in glob.glob(str(p / "*.safetensors")))
    if not files and p.is_dir():
        files = sorted(Path(f) for f in glob.glob(str(p / "*.bin")))
    if not files:
        raise ConfigError(f"no weights (*.safetensors or *.bin) in {str(p)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as exc:  # weights_only refuses pickled code: that is the point
                raise ConfigError(f"{str(f)!r} is not a tensor-only weights file ({exc}); convert it to safetensors")
    return state


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, prefixes: tuple[str, ...]) -> None:
    def strip(key: str) -> str:
        for pre in prefixes:
            if key.startswith(pre):
                return key[len(pre):]
        return key

    state = {strip(k): v for k, v in state.items()}
    own = module.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("rotary_emb.inv_freq")]
    if wrong or missing:
        detail = "; ".join(wrong[:3]) or f"missing {', '.join(missing[:3])}"
        raise ConfigError(f"weights in {source!r} do not match the preset's shapes ({detail}): "
                          f"choose the preset that matches them (--case)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def build_model(preset: ModelPreset, *, image_token_id: int, pad_token_id: int, dtype: str,
                attn_implementation: str, device: torch.device, weights: WeightPaths | None = None,
                zero3_config: dict[str, Any] | None = None) -> Any:
    """A ``LlavaForConditionalGeneration`` with the preset's shapes.

    Random weights are created directly on ``device`` (or partitioned by ZeRO-3's ``zero.Init`` when
    ``zero3_config`` is given), which avoids minutes of host-side init for 7B/13B shapes.
    """
    from transformers import LlavaForConditionalGeneration

    weights = weights or WeightPaths()
    cfg = preset.llava_config(image_token_id=image_token_id, pad_token_id=pad_token_id)
    torch_dtype = DTYPES[dtype]
    if weights.random and zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # makes _from_config build under zero.Init
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch_dtype, attn_implementation=attn_implementation)
        model._accelbench_ds_config = keep_alive  # type: ignore[attr-defined]
    else:
        with torch.device(device if weights.random else "cpu"):
            model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch_dtype, attn_implementation=attn_implementation)
    if weights.llm:
        _load_into(model.model.language_model, read_state_dict(weights.llm), weights.llm, ("model.", "language_model."))
        lm = {k.removeprefix("lm_head."): v for k, v in read_state_dict(weights.llm).items() if k.startswith("lm_head.")}
        _load_into(model.lm_head, lm, weights.llm, ())
    if weights.vision_tower:
        _load_into(model.model.vision_tower, read_state_dict(weights.vision_tower), weights.vision_tower, ())
    if weights.projector:
        load_projector(model, weights.projector)
    model.config.use_cache = False
    model._accelbench_adjustments = fix_generation_config(model)  # type: ignore[attr-defined]
    return model


PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")
LLAVA_PROJECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                        "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


def load_projector(model: Any, path: str) -> None:
    """Load a projector saved by accelbench or by LLaVA (mm_projector: Sequential keys 0/2)."""
    state = read_state_dict(path)
    out = {}
    for k, v in state.items():
        for pre in PROJECTOR_PREFIXES:
            k = k.removeprefix(pre)
        out[LLAVA_PROJECTOR_KEYS.get(k, k)] = v
    _load_into(model.model.multi_modal_projector, out, path, ())


def freeze_for_stage(model: Any, stage: str) -> list[torch.nn.Parameter]:
    """Pretrain trains the projector only; finetune trains LLM + projector. The vision tower stays frozen and
    runs without autograd, as LLaVA's ``CLIPVisionTower.forward`` (``@torch.no_grad``) does.

    Without that, transformers' ``enable_input_require_grads`` (called by activation checkpointing) makes CLIP's
    patch embeddings require grad, and every step back-propagates activation gradients through the 24 frozen
    CLIP layers, replaying them, for nothing: no weight upstream of the projector is trained. Under ZeRO-3 that
    backward also gathers the tower's parameters a second time."""
    vision = model.model.vision_tower
    vision.forward = types.MethodType(_forward_without_grad, vision)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.model.multi_modal_projector]
    if stage == "finetune":
        trainable += [model.model.language_model, model.lm_head]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def enable_checkpointing(model: Any, llm_layers: int | None = None) -> None:
    """Activation checkpointing (non-reentrant) for the vision tower and the first ``llm_layers`` decoder
    layers (None: all); the later decoder layers keep their activations and are not replayed.

    The first layers are the ones checkpointed: the last layers' backward runs first, while memory is
    at its peak, and needs no replay working set there.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if llm_layers is not None:
        replay_first_layers(model, llm_layers)
    # frozen embeddings still need grads to flow into checkpointed layers (projector training in pretrain)
    model.enable_input_require_grads()


def _forward_without_grad(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def replay_first_layers(model: Any, k: int) -> None:
    """Checkpoint (replay in backward) the first ``k`` decoder layers and keep the activations of the rest.

    Read at each layer's call, so it can change between micro-batches; a compiled layer has a graph for each
    setting and does not recompile."""
    for index, layer in enumerate(model.model.language_model.layers):
        layer.gradient_checkpointing = index < k


def fix_generation_config(model: Any) -> list[Any]:
    """Make generation settings consistent after ``use_cache = False`` so saving never fails.

    transformers refuses to save a GenerationConfig whose temperature/top_p are set while do_sample is
    False (Vicuna ships temperature 0.9 / top_p 0.6). FlagPerf's Iluvatar port added do_sample=True by hand.
    """
    from ..capabilities import Adjustment

    gen = getattr(model, "generation_config", None)
    if gen is None or gen.do_sample:
        return []
    sampled = [k for k, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50))
               if getattr(gen, k, None) not in (None, default)]
    if not sampled:
        return []
    gen.do_sample = True
    return [Adjustment("generation_config.do_sample", False, True,
                       f"{', '.join(sampled)} set while do_sample is False: transformers refuses to save that",
                       "trainer")]

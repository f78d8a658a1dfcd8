"""Model presets: the shapes of LLaVA-1.5 (Vicuna + CLIP ViT-L/14-336 + mlp2x_gelu) and a tiny twin.

Pure data, no heavy imports: the planner, memory model and FLOP accounting read these.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class VisionShapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    feature_layer: int = -2  # LLaVA takes the penultimate layer's output

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        return self.patches  # "default" strategy drops CLS

    @property
    def layers_run(self) -> int:
        """Encoder layers whose output can reach the projector."""
        return self.layers + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer

    @property
    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        embed = 3 * self.patch_size**2 * h + (self.patches + 1) * h + h
        return self.layers * per_layer + embed + 4 * h  # pre/post layernorms


@dataclass(frozen=True)
class LLMShapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_position: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden

    @property
    def non_embedding_params(self) -> int:
        """Parameters that do matmul work per token (layers + lm_head)."""
        return self.layers * self.layer_params + self.vocab * self.hidden


@dataclass(frozen=True)
class ModelPreset:
    name: str
    vision: VisionShapes
    llm: LLMShapes
    nominal_params: float  # the "N" that FlagPerf's formula uses (7e9 / 13e9)
    # learning rates per stage where the case differs from LLaVA-1.5's (1e-3 pretrain, 2e-5 finetune)
    stage_lr: tuple[tuple[str, float], ...] = ()

    @property
    def projector_params(self) -> int:
        v, h = self.vision.hidden, self.llm.hidden
        return v * h + h + h * h + h

    @property
    def params(self) -> int:
        return self.vision.params + self.projector_params + self.llm.params

    def with_vocab(self, vocab: int) -> "ModelPreset":
        return replace(self, llm=replace(self.llm, vocab=vocab))

    def llava_config(self, image_token_id: int, pad_token_id: int | None = None) -> Any:
        """A fresh transformers ``LlavaConfig`` (fresh each call: ``_from_config`` mutates it)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        v, t = self.vision, self.llm
        vision = CLIPVisionConfig(
            hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
            projection_dim=768 if v.hidden >= 768 else v.hidden, hidden_act="quick_gelu",
        )
        text = LlamaConfig(
            hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
            num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, vocab_size=t.vocab,
            max_position_embeddings=t.max_position, rms_norm_eps=1e-5, pad_token_id=pad_token_id,
            tie_word_embeddings=False,
        )
        return LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id,
            vision_feature_layer=v.feature_layer, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", image_seq_length=v.image_tokens, tie_word_embeddings=False,
        )


CLIP_L14_336 = VisionShapes(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14)

PRESETS: dict[str, ModelPreset] = {
    "llava1.5-7b": ModelPreset(
        "llava1.5-7b", CLIP_L14_336,
        LLMShapes(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000), 7e9,
    ),
    "llava1.5-13b": ModelPreset(
        "llava1.5-13b", CLIP_L14_336,
        LLMShapes(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000), 13e9,
    ),
    # Same structure, CPU-sized: 16 image tokens, ~0.3 M parameters with a 1k vocabulary.
    "tiny": ModelPreset(
        "tiny",
        VisionShapes(hidden=32, intermediate=64, layers=3, heads=2, image_size=56, patch_size=14),
        LLMShapes(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=1024, max_position=2048),
        3e5,
        # a 0.3 M-parameter model learns visibly in a few dozen steps only with larger steps
        stage_lr=(("pretrain", 1e-2), ("finetune", 3e-3)),
    ),
}


class UnknownPresetError(ConfigError):
    pass


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown case/preset {name!r}: choose one of {', '.join(PRESETS)}"
        ) from None

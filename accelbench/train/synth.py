"""A synthetic LLaVA-1.5 data set in the real file formats, plus a tokenizer trained on it.

Images are small pictures of coloured shapes; captions and answers name the colours,
shapes, sizes and positions, so a tiny model has something learnable. Everything is
deterministic in ``seed`` and goes through the same loaders as the real data.

Callers on several ranks should synthesize on one rank and barrier: writes are not atomic.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from accelbench.train.data import VICUNA_SYSTEM, build_pieces, text_token_counts

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama / Vicuna
SYNTH_VERSION = 1  # bump when the output changes, so caches are rebuilt
MODEL_MAX_LENGTH = 2048
PRETRAIN_JSON = "blip_laion_cc_sbu_558k.json"
FINETUNE_JSON = "llava_v1_5_mix665k.json"
# Text-token budgets (bos/eos included, image tokens not): multimodal records leave room
# for 576 image tokens within 2048, text-only ones may use the whole context.
PRETRAIN_TOKENS = (10, 60)
MULTIMODAL_BUDGET = MODEL_MAX_LENGTH - 576 - 72
TEXT_ONLY_BUDGET = MODEL_MAX_LENGTH
TEXT_ONLY_FRACTION = 0.06

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "orange": (245, 140, 20), "purple": (140, 50, 180), "pink": (240, 120, 180), "brown": (130, 80, 40),
    "black": (15, 15, 15), "cyan": (30, 200, 210), "gray": (128, 128, 128), "magenta": (210, 30, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "beige": (235, 225, 200), "light gray": (210, 210, 210),
    "pale blue": (200, 225, 245), "pale green": (215, 240, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ellipse")
SIDES = {"square": "four", "triangle": "three", "diamond": "four", "hexagon": "six", "star": "ten",
         "cross": "twelve", "circle": "no", "ellipse": "no"}
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.32}
POSITIONS = {  # grid cell -> (x, y) as fractions of the image
    "top left": (0.2, 0.2), "top": (0.5, 0.2), "top right": (0.8, 0.2),
    "left": (0.2, 0.5), "center": (0.5, 0.5), "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8), "bottom": (0.5, 0.8), "bottom right": (0.8, 0.8),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
PRETRAIN_PROMPTS = (
    "Give a brief description of the image.", "Describe the image concisely.",
    "Write a terse but informative summary of the picture.", "Share a concise interpretation of the image provided.",
    "Provide a brief description of the given image.", "Summarize the visual content of the image.",
)


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    width: int
    height: int


# --------------------------------------------------------------------------- images


def random_scene(rng: random.Random, image_size: int) -> Scene:
    # Varied aspect ratios so that "crop" and "pad" preprocessing both matter.
    aspect = rng.choice((1.0, 1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.5))
    width = max(8, round(image_size * min(1.0, aspect)))
    height = max(8, round(image_size * min(1.0, 1 / aspect)))
    cells = rng.sample(sorted(POSITIONS), rng.choice((1, 1, 2, 2, 3)))
    shapes = tuple(Shape(rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(sorted(SIZES)), cell)
                   for cell in cells)
    return Scene(rng.choice(sorted(BACKGROUNDS)), shapes, width, height)


def _polygon(cx: float, cy: float, r: float, points: int, rotation: float, inner: float = 1.0) -> list[tuple[float, float]]:
    out = []
    for k in range(points * (2 if inner != 1.0 else 1)):
        radius = r if inner == 1.0 or k % 2 == 0 else r * inner
        angle = rotation + k * math.pi / (points if inner != 1.0 else points / 2)
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fx, fy = POSITIONS[s.position]
        cx, cy = fx * scene.width, fy * scene.height
        r = SIZES[s.size] * min(scene.width, scene.height)
        fill = COLORS[s.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "ellipse":
            draw.ellipse((cx - r, cy - r * 0.55, cx + r, cy + r * 0.55), fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        elif s.shape == "triangle":
            draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2), fill=fill)
        elif s.shape == "diamond":
            draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
        elif s.shape == "hexagon":
            draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
        elif s.shape == "star":
            draw.polygon(_polygon(cx, cy, r, 5, -math.pi / 2, inner=0.45), fill=fill)
        else:  # cross
            t = r * 0.35
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img


# --------------------------------------------------------------------------- text


def _sentence(rng: random.Random, scene: Scene | None) -> str:
    """One grounded sentence about the scene (or general shape lore when there is none)."""
    if scene is None or rng.random() < 0.25:
        shape, c1, c2 = rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(sorted(COLORS))
        return rng.choice((
            f"A {shape} has {SIDES[shape]} straight sides.",
            f"A {c1} {shape} stands out clearly against a light background.",
            f"Shapes such as the {shape} are often drawn in {c1} or {c2}.",
            f"When a {c1} shape sits next to a {c2} one, the contrast helps the eye separate them.",
            f"Counting the corners of a {shape} is a simple way to recognise it.",
        ))
    s = rng.choice(scene.shapes)
    return rng.choice((
        f"There is {s.phrase} in the {s.position} of the image.",
        f"The {s.color} {s.shape} is {s.size} and sits in the {s.position}.",
        f"The background is {scene.background}.",
        f"The picture contains {NUMBER_WORDS[len(scene.shapes)]} {'shape' if len(scene.shapes) == 1 else 'shapes'}.",
        f"In the {s.position} we can see {s.phrase}.",
        f"The {s.shape} is painted {s.color}.",
    ))


def _text_of_words(rng: random.Random, scene: Scene | None, words: int, lead: str = "") -> str:
    parts = [lead] if lead else []
    count = len(lead.split())
    while count < words:
        sentence = _sentence(rng, scene)
        parts.append(sentence)
        count += len(sentence.split())
    return " ".join(parts)


def _caption(rng: random.Random, scene: Scene) -> str:
    core = " and ".join(f"{s.phrase} in the {s.position}" for s in scene.shapes)
    lead = f"{core[0].upper()}{core[1:]} on a {scene.background} background."
    words = min(45, max(8, round(rng.lognormvariate(math.log(14), 0.5))))
    return _text_of_words(rng, scene, words, lead)


def _qa(rng: random.Random, scene: Scene, detailed: bool) -> tuple[str, str]:
    s = rng.choice(scene.shapes)
    if detailed:
        question = rng.choice(("Describe the image in detail.", "What do you see in this picture?",
                               "Explain the layout of the shapes in the image."))
        words = min(900, max(20, round(rng.lognormvariate(math.log(70), 0.9))))
        return question, _text_of_words(rng, scene, words, f"The image shows {s.phrase} on a {scene.background} background.")
    kind = rng.randrange(5)
    if kind == 0:
        return f"What color is the {s.shape}?", f"The {s.shape} is {s.color}."
    if kind == 1:
        return f"Where is the {s.color} {s.shape}?", f"It is in the {s.position} of the image."
    if kind == 2:
        n = len(scene.shapes)
        return "How many shapes are there?", f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]}."
    if kind == 3:
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        present = any(x.color == color and x.shape == shape for x in scene.shapes)
        return f"Is there a {color} {shape} in the image?", "Yes." if present else "No."
    return f"What shape is in the {s.position}?", f"There is {s.phrase} in the {s.position}."


def _finetune_record(rng: random.Random, index: int, scene: Scene | None, rel_path: str | None) -> dict[str, Any]:
    turns: list[dict[str, str]] = []
    if scene is None:  # ShareGPT-like text-only chat: few turns, long answers, long tail
        for _ in range(rng.choice((1, 1, 2, 3))):
            topic = rng.choice(SHAPES)
            words = min(1800, max(30, round(rng.lognormvariate(math.log(250), 0.8))))
            turns += [{"from": "human", "value": f"Tell me about the {topic} and how colours are used with it."},
                      {"from": "gpt", "value": _text_of_words(rng, None, words)}]
        return {"id": f"sharegpt_{index:06d}", "conversations": turns}
    for k in range(rng.choice((1, 1, 2, 3, 4, 5, 6))):
        question, answer = _qa(rng, scene, detailed=rng.random() < 0.3)
        if k == 0:  # mix665k puts <image> either first or last in the first question
            question = f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.7 else f"{question}\n{IMAGE_TOKEN}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"{index:012d}", "image": rel_path, "conversations": turns}


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path) -> Any:
    """Llama-style BPE (byte fallback, Metaspace) with <unk>,<s>,</s> = 0,1,2 and <image> last.

    Layout: specials, the 256 ``<0xNN>`` byte tokens (as in Llama), trained pieces, then
    unreachable ``<reserved_k>`` fillers so the total is exactly ``vocab_size``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    room = vocab_size - 1 - len(byte_tokens)  # the trainer's share; 1 slot for <image>
    if room < 64:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least {len(byte_tokens) + 65}")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    draft.pre_tokenizer = metaspace
    draft.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=room, special_tokens=list(SPECIAL_TOKENS), show_progress=False))
    trained = json.loads(draft.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    ordered = [*SPECIAL_TOKENS, *byte_tokens, *pieces]
    ordered += [f"<reserved_{k}>" for k in range(vocab_size - 1 - len(ordered))]
    vocab = {token: i for i, token in enumerate(ordered)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>",  # LLaVA v1 pads with unk
        model_max_length=MODEL_MAX_LENGTH, padding_side="right",
    )
    fast.save_pretrained(str(out_dir))
    return fast


# --------------------------------------------------------------------------- lengths


def _fit(records: list[dict], tokenizer: Any, template: str, budget: int) -> None:
    """Trim records (in place) until their template text fits ``budget`` tokens."""
    for _ in range(40):
        counts = text_token_counts([build_pieces(r, template) for r in records], tokenizer)  # type: ignore[arg-type]
        over = [(r, n) for r, n in zip(records, counts) if n > budget]
        if not over:
            return
        for record, n in over:
            turns = record["conversations"]
            if len(turns) > 2 and template != "plain":
                del turns[-2:]
            else:
                words = turns[1]["value"].split()
                keep = max(1, min(len(words) - 1, int(len(words) * budget / n) - 2))
                turns[1]["value"] = " ".join(words[:keep]).rstrip(".,") + "."
    raise RuntimeError("synthetic records did not converge to the length budget")


def _pad_short_captions(records: list[dict], tokenizer: Any, rng: random.Random, minimum: int) -> None:
    for _ in range(20):
        counts = text_token_counts([build_pieces(r, "plain") for r in records], tokenizer)
        short = [r for r, n in zip(records, counts) if n < minimum]
        if not short:
            return
        for record in short:
            record["conversations"][1]["value"] += " " + _sentence(rng, None)
    raise RuntimeError("synthetic captions did not reach the minimum length")


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 2)}


# --------------------------------------------------------------------------- entry point


def _paths(out_dir: Path, mmmu: bool) -> dict[str, Path]:
    paths = {"pretrain_json": out_dir / PRETRAIN_JSON, "finetune_json": out_dir / FINETUNE_JSON,
             "image_folder": out_dir / "images", "tokenizer": out_dir / "tokenizer",
             "manifest": out_dir / "manifest.json"}
    if mmmu:
        paths["mmmu"] = out_dir / "mmmu"
    return paths


def _cached(paths: dict[str, Path], params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(paths["manifest"].read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and all(p.exists() for p in paths.values())


def synthesize(out_dir: Path, *, n_pretrain: int = 256, n_finetune: int = 256, image_size: int = 64,
               vocab_size: int = 1024, seed: int = 0, mmmu: bool = True) -> dict[str, Path]:
    """Write the synthetic data set under ``out_dir`` (or reuse it); returns its paths.

    Keys: pretrain_json, finetune_json, image_folder, tokenizer, manifest, and mmmu if asked.
    """
    out_dir = Path(out_dir)
    params = {"version": SYNTH_VERSION, "n_pretrain": n_pretrain, "n_finetune": n_finetune,
              "image_size": image_size, "vocab_size": vocab_size, "seed": seed, "mmmu": mmmu}
    paths = _paths(out_dir, mmmu)
    if _cached(paths, params):
        return paths
    if n_pretrain < 1 or n_finetune < 1:
        raise ValueError("n_pretrain and n_finetune must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)  # an interrupted run must not look complete
    for owned in ("images", "tokenizer"):
        shutil.rmtree(out_dir / owned, ignore_errors=True)

    rng = random.Random(seed)
    image_folder = paths["image_folder"]
    pretrain: list[dict] = []
    for i in range(n_pretrain):
        scene = random_scene(rng, image_size)
        rel = f"lcs/{i // 1000:05d}/{i:09d}.png"  # LCS-558K's "00000/000000010.jpg" layout
        _save(draw_scene(scene), image_folder / rel)
        prompt = rng.choice(PRETRAIN_PROMPTS)
        prompt = f"{prompt}\n{IMAGE_TOKEN}" if rng.random() < 0.5 else f"{IMAGE_TOKEN}\n{prompt}"
        pretrain.append({"id": f"{i:09d}", "image": rel, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": _caption(rng, scene)}]})
    finetune: list[dict] = []
    for i in range(n_finetune):
        if rng.random() < TEXT_ONLY_FRACTION:
            finetune.append(_finetune_record(rng, i, None, None))
            continue
        scene = random_scene(rng, image_size)
        rel = f"coco/train2017/{i:012d}.png"
        _save(draw_scene(scene), image_folder / rel)
        finetune.append(_finetune_record(rng, i, scene, rel))

    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT:"] * 8
    corpus += [t["value"].replace(IMAGE_TOKEN, "") for r in pretrain + finetune for t in r["conversations"]]
    tokenizer = train_tokenizer(corpus, vocab_size, paths["tokenizer"])

    _pad_short_captions(pretrain, tokenizer, rng, PRETRAIN_TOKENS[0])
    _fit(pretrain, tokenizer, "plain", PRETRAIN_TOKENS[1])
    _fit([r for r in finetune if "image" in r], tokenizer, "vicuna_v1", MULTIMODAL_BUDGET)
    _fit([r for r in finetune if "image" not in r], tokenizer, "vicuna_v1", TEXT_ONLY_BUDGET)

    _write_json(paths["pretrain_json"], pretrain)
    _write_json(paths["finetune_json"], finetune)
    if mmmu:
        from accelbench.eval.mmmu_synth import write_synthetic_mmmu  # lazy: optional sibling module
        write_synthetic_mmmu(paths["mmmu"], seed=seed)

    pre_len = text_token_counts([build_pieces(r, "plain") for r in pretrain], tokenizer)
    fin_len = text_token_counts([build_pieces(r, "vicuna_v1") for r in finetune], tokenizer)
    manifest = {
        "params": params,
        "counts": {"pretrain": len(pretrain), "finetune": len(finetune),
                   "finetune_text_only": sum("image" not in r for r in finetune),
                   "images": sum("image" in r for r in pretrain + finetune)},
        "text_tokens": {"pretrain_plain": _summary(pre_len), "finetune_vicuna_v1": _summary(fin_len),
                        "note": "bos/eos and template text included, image tokens excluded"},
        "turns": _summary([len(r["conversations"]) // 2 for r in finetune]),
        "token_ids": {"unk": tokenizer.unk_token_id, "bos": tokenizer.bos_token_id,
                      "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                      "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), "vocab_size": len(tokenizer)},
        "files": {k: str(v.relative_to(out_dir)) for k, v in paths.items()},
    }
    _write_json(paths["manifest"], manifest)  # last: its presence marks a complete folder
    return paths


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)

"""ZeRO-3 checkpoint/resume continues exactly: a run saved at step K by ``checkpoint.save`` and continued
by a fresh engine after ``checkpoint.load`` gives the uninterrupted run's per-step losses, gradient
norms and learning rates (engine level, tiny preset, CPU, one rank over gloo).

The engine runs in a child process so DeepSpeed's globals (accelerator, process group, HF's
``HfDeepSpeedConfig``) never leak into the pytest process.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

STEPS, SAVE_AT, MICRO_BATCH, TEXT_LEN, IMAGE_TOKEN = 6, 3, 4, 24, 1000


def _child(dtype: str, ckpt_dir: str) -> dict:
    import deepspeed
    import torch
    from deepspeed.accelerator import set_accelerator

    from accelbench.backends import load_registry

    set_accelerator(load_registry().select("cpu").deepspeed_accelerator())
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import safe_get_full_fp32_param

    from accelbench.cases import get_preset
    from accelbench.train import checkpoint
    from accelbench.train.ds_config import deepspeed_config
    from accelbench.train.model import build_model, enable_checkpointing, freeze_for_stage
    from accelbench.train.objective import LlavaObjective
    from accelbench.train.stage import cosine_with_warmup

    preset = get_preset("tiny")
    # what the finetune stage runs: ZeRO-3 with HF's "auto" sizes, params built under zero.Init
    config = deepspeed_config(zero_stage=3, micro_batch=MICRO_BATCH, grad_accum=1, world_size=1, dtype=dtype,
                              hidden_size=preset.llm.hidden)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def batch(n: int) -> dict:
        g = torch.Generator().manual_seed(1000 + n)
        image = torch.full((MICRO_BATCH, preset.vision.image_tokens), IMAGE_TOKEN)
        text = torch.randint(0, IMAGE_TOKEN - 1, (MICRO_BATCH, TEXT_LEN), generator=g)
        size = preset.vision.image_size
        return {"input_ids": torch.cat([image, text], 1), "labels": torch.cat([torch.full_like(image, -100), text], 1),
                "pixel_values": torch.randn(MICRO_BATCH, 3, size, size, generator=g).to(torch_dtype)}

    def engine(init_seed: int):
        torch.manual_seed(init_seed)  # a resumed process builds its model from other random numbers
        model = build_model(preset, image_token_id=IMAGE_TOKEN, pad_token_id=0, dtype=dtype,
                            attn_implementation="sdpa", device=torch.device("cpu"), zero3_config=config)
        trainable = freeze_for_stage(model, "finetune")
        enable_checkpointing(model)
        optimizer = torch.optim.AdamW(trainable, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0)
        eng, _, _, _ = deepspeed.initialize(model=LlavaObjective(model), optimizer=optimizer,
                                            lr_scheduler=cosine_with_warmup(optimizer, STEPS), config=config)
        eng.train()
        return eng, model

    def train(eng, first: int, last: int) -> list:
        out = []
        for n in range(first + 1, last + 1):
            torch.manual_seed(7 + n)  # the trainer's per-step seed
            loss = eng(**batch(n))
            eng.backward(loss)
            eng.step()
            out.append([n, loss.item(), float(eng.get_global_grad_norm()), float(eng.get_lr()[0])])
        return out

    straight = train(engine(0)[0], 0, STEPS)

    first, _ = engine(0)
    train(first, 0, SAVE_AT)
    checkpoint.save(first, ckpt_dir, SAVE_AT, {"step": SAVE_AT, "epoch": 0}, rank=0)
    del first

    resumed, model = engine(1)
    probe = model.lm_head.weight
    before = safe_get_full_fp32_param(probe).clone()
    state = checkpoint.load(resumed, ckpt_dir, SAVE_AT)
    loaded = not torch.equal(before, safe_get_full_fp32_param(probe))
    after = train(resumed, SAVE_AT, STEPS)
    return {"straight": straight, "resumed": after, "state_step": state["step"], "loaded": loaded,
            "global_steps": resumed.global_steps}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero3_resume_continues_with_the_straight_runs_losses(dtype, tmp_path):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, __file__, dtype, str(tmp_path / "run"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["loaded"], "load_checkpoint left the fresh engine's weights as they were"
    assert r["state_step"] == SAVE_AT and r["global_steps"] == STEPS
    straight = {s[0]: s for s in r["straight"]}
    assert [s[0] for s in r["resumed"]] == list(range(SAVE_AT + 1, STEPS + 1))
    assert len({round(s[1], 4) for s in r["straight"]}) > 1  # it trains: the comparison is not vacuous
    for n, loss, grad_norm, lr in r["resumed"]:
        want = straight[n]
        assert abs(loss - want[1]) <= 1e-5, (n, loss, want[1])
        assert abs(grad_norm - want[2]) <= 1e-5 * max(1.0, want[2]), (n, grad_norm, want[2])
        assert abs(lr - want[3]) <= 1e-12, (n, lr, want[3])


if __name__ == "__main__":
    result = _child(sys.argv[1], sys.argv[2])
    with open(sys.argv[3], "w", encoding="utf-8") as f:
        json.dump(result, f)

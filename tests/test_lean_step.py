"""Lever "lean-step" (train/zero3_step.py) updates the model as DeepSpeed's own ZeRO-3 step does: over two gloo
ranks in bf16, with several optimizer sub-groups and a gradient clip that acts, the float32 master weights, the
gradient norms and the LR schedule of both steps agree to rounding at every step, and a step whose gradients are
not finite is skipped by both, weights, AdamW moments and schedule alike.

The run is a child process (torch.distributed.run) so DeepSpeed's globals never leak into pytest.
"""
import json
import math
import os
import subprocess
import sys

import pytest

STEPS, NAN_STEP = 5, 3  # step 3's loss is NaN


def _child(out: str) -> None:
    import deepspeed
    import torch
    from deepspeed.accelerator import set_accelerator

    from accelbench.backends import load_registry
    from accelbench.train import zero3_step

    set_accelerator(load_registry().select("cpu").deepspeed_accelerator())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              # small sub-groups: the step loops over several, as a 7B/13B partition does over 1e9-element ones
              "zero_optimization": {"stage": 3, "sub_group_size": 1000, "stage3_param_persistence_threshold": 0}}

    def engine(fused: bool, lean: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48),
                                    torch.nn.Tanh(), torch.nn.Linear(48, 8)).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
        reason = zero3_step.install(eng) if lean else None
        return eng, reason

    runs = {"deepspeed": engine(True, False), "lean": engine(True, True), "unfused": engine(False, True)}
    def master(eng) -> list[float]:
        return torch.cat([p.detach().flatten() for p in eng.optimizer.fp32_partitioned_groups_flat]).tolist()

    record: dict = {name: {"reason": reason, "start": master(eng), "steps": []} for name, (eng, reason) in runs.items()}
    zero = runs["lean"][0].optimizer
    grads = zero.averaged_gradients
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(10 * step + rank)
        x = torch.randn(4, 32, generator=g).to(torch.bfloat16)
        for name, (eng, _) in runs.items():
            loss = (eng(x).float() ** 2).mean() * 50  # large gradients: the clip at 1.0 acts
            if step == NAN_STEP:
                loss = loss * float("nan")
            eng.backward(loss)
            if name == "lean" and step == 1:  # the fast path: each sub-group's gradients are a slice of the buffer
                buffer = zero.grad_partitions_flat_buffer
                record["slices"] = [zero3_step.flat_gradient(zero, i).untyped_storage().data_ptr()
                                    == buffer.untyped_storage().data_ptr() for i in range(len(grads))]
                record["sub_groups"] = len(grads)
            eng.step()
            opt = eng.optimizer
            moments = [s["exp_avg"].abs().sum().item() for s in opt.optimizer.state.values()]
            record[name]["steps"].append({
                "norm": float(eng.get_global_grad_norm()), "lr": eng.get_lr()[0], "skipped": eng.skipped_steps,
                "master": master(eng),
                "moments": moments})
    with open(f"{out}.{rank}", "w", encoding="utf-8") as f:
        json.dump(record, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("lean_step")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(tmp / "run.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp / f"run.json.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_the_lean_step_updates_the_weights_as_deepspeeds_step_does(ranks):
    for run in ranks:
        assert run["lean"]["reason"] is None and run["deepspeed"]["reason"] is None
        assert run["sub_groups"] > 1 and all(run["slices"])  # no concatenation: the buffer's own slices
        ours, theirs = run["lean"]["steps"], run["deepspeed"]["steps"]
        start = run["deepspeed"]["start"]
        assert run["lean"]["start"] == start
        for n, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
            assert a["skipped"] == b["skipped"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
            if n == NAN_STEP:
                assert a["norm"] == b["norm"] == math.inf
                continue
            assert b["norm"] > 1.0  # the clip acted on this step
            assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)
            moved = max(abs(x - y) for x, y in zip(b["master"], start))
            assert moved > 1e-3  # the weights trained
            # and both steps agree to rounding: to a few float32 ulps of each weight (one ulp is 1.2e-7 of it, or
            # less), or of the updates that moved it
            assert a["master"] == pytest.approx(b["master"], rel=1e-6, abs=1e-6 * moved)
            assert a["moments"] == pytest.approx(b["moments"], rel=1e-5)


@pytest.mark.slow
def test_a_step_with_non_finite_gradients_is_skipped_like_deepspeeds(ranks):
    for run in ranks:
        for name in ("lean", "deepspeed"):
            steps = run[name]["steps"]
            before, nan, after = steps[NAN_STEP - 2], steps[NAN_STEP - 1], steps[NAN_STEP]
            assert [s["skipped"] for s in (before, nan, after)] == [0, 1, 1]
            assert nan["master"] == before["master"] and nan["moments"] == before["moments"]  # nothing moved
            assert nan["lr"] == before["lr"] and after["lr"] < nan["lr"]  # the schedule waited one step
            assert after["master"] != nan["master"]  # and training went on


@pytest.mark.slow
def test_without_torchs_fused_adamw_deepspeeds_step_stays(ranks):
    for run in ranks:
        assert "fused" in run["unfused"]["reason"]
        # it is DeepSpeed's step that ran, and it trains like the others
        assert run["unfused"]["steps"][0]["norm"] == pytest.approx(run["deepspeed"]["steps"][0]["norm"], rel=1e-5)


if __name__ == "__main__":
    _child(sys.argv[1])

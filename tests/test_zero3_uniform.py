"""ZeRO-3 gathers parameters module by module with collectives, so every rank must call the same modules
the same number of times: the objective's lm_head chunk count and the vision tower must not depend on
what a rank's micro-batch holds (a mismatch hangs the step; see train/objective.py)."""
import pytest
import torch

from accelbench.train.packing import collate_packed
from accelbench.train.objective import LlavaObjective, lm_head_calls, selected_cross_entropy

from test_packing import IMAGE, _sample  # noqa: F401  (fixtures below reuse the tiny samples)
from test_packing import model  # noqa: F401


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _inputs(batch: dict) -> dict:
    keys = ("input_ids", "labels", "pixel_values", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k")
    return {k: batch[k] for k in keys}


def test_lm_head_calls_from_the_token_bound():
    assert lm_head_calls(1) == 1 and lm_head_calls(4096) == 1 and lm_head_calls(4097) == 2
    assert lm_head_calls(16 * 2048) == 8


@pytest.mark.parametrize("targets", [0, 1, 5, 37])
def test_fixed_number_of_lm_head_calls_whatever_the_targets(targets):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    calls = _count_calls(head)
    hidden = torch.randn(1, 40, 8, requires_grad=True)
    labels = torch.full((1, 40), -100)
    labels[0, 1:targets + 1] = torch.randint(0, 11, (targets,))
    loss = selected_cross_entropy(head, hidden, labels, calls=3)
    loss.backward()
    assert calls[0] == 6  # 3 chunks forward + 3 replays in backward, empty chunks included
    free = selected_cross_entropy(head, hidden, labels, chunk=4)  # sized by the targets: a rank-dependent count
    assert loss.item() == pytest.approx(free.item(), rel=1e-6, abs=1e-7)


def test_image_less_batch_still_runs_the_vision_tower_with_zero_weight(model):  # noqa: F811
    g = torch.Generator().manual_seed(3)
    batch = collate_packed([_sample(0, 30, False, g), _sample(1, 12, False, g)], pad_token_id=0)
    assert batch["pixel_values"] is None
    tower = _count_calls(model.model.vision_tower)
    projector = _count_calls(model.model.multi_modal_projector)
    with torch.no_grad():
        plain = LlavaObjective(model)(**_inputs(batch))
        assert tower[0] == 0 and projector[0] == 0
        uniform = LlavaObjective(model, uniform_calls=True, lm_head_calls=2)(**_inputs(batch))
    assert tower[0] == 1 and projector[0] == 1
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-6)


def test_uniform_calls_do_not_change_a_batch_with_images(model):  # noqa: F811
    g = torch.Generator().manual_seed(4)
    batch = collate_packed([_sample(0, 30, True, g), _sample(1, 12, False, g)], pad_token_id=0)
    tower = _count_calls(model.model.vision_tower)
    with torch.no_grad():
        plain = LlavaObjective(model)(**_inputs(batch))
        uniform = LlavaObjective(model, uniform_calls=True, lm_head_calls=4)(**_inputs(batch))
    assert tower[0] == 2  # once per forward: no extra blank image when the batch has one
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.slow
def test_zero3_run_survives_an_image_less_micro_batch_on_one_rank(tmp_path, image_less_rank_data):
    """2 ZeRO-3 ranks, micro-batch 1: one rank gets a text-only sample while the other gets an image. Before
    every rank ran the vision tower, this step never finished."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache")}
    data = image_less_rank_data
    out = subprocess.run([sys.executable, "-m", "accelbench", "run", "--stages", "finetune", "--data", str(data),
                          "--nproc-per-node", "2", "--mbs", "1", "--steps", "4", "--no-eval", "--hang-timeout", "60",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["stages"]["finetune"]["plan"]["zero_stage"] == 3
    assert result["stages"]["finetune"]["metrics"]["steps"] == 4

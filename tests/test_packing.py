"""Packing: no token attends across a sample boundary, and the objective equals transformers' loss."""
import pytest
import torch
import torch.nn.functional as F

from accelbench.cases import PRESETS
from accelbench.train.data import IGNORE_INDEX, collate
from accelbench.train.objective import LlavaObjective, selected_cross_entropy
from accelbench.train.packing import collate_packed
from accelbench.train.varlen_attention import register

IMAGE = 1023


def _sample(i: int, n_text: int, image: bool, g: torch.Generator) -> dict:
    n_img = PRESETS["tiny"].vision.image_tokens
    ids = torch.randint(3, 1000, (n_text,), generator=g)
    labels = ids.clone()
    labels[: n_text // 3] = IGNORE_INDEX  # a prompt part that is not trained on
    if image:
        ids = torch.cat([ids[:1], torch.full((n_img,), IMAGE), ids[1:]])
        labels = torch.cat([labels[:1], torch.full((n_img,), IGNORE_INDEX), labels[1:]])
    labels[0] = IGNORE_INDEX
    pix = torch.randn(3, 56, 56, generator=g) if image else None
    return {"id": str(i), "input_ids": ids, "labels": labels, "pixel_values": pix}


@pytest.fixture(scope="module")
def model():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    name = register()
    m = LlavaForConditionalGeneration._from_config(PRESETS["tiny"].llava_config(image_token_id=IMAGE),
                                                   attn_implementation=name)
    return m.eval()


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(1)
    return [_sample(0, 40, True, g), _sample(1, 7, False, g), _sample(2, 90, True, g), _sample(3, 25, True, g)]


def _per_token_losses(model, batch):
    out = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=None,
                      position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                      cu_seq_lens_k=batch["cu_seq_lens_k"], max_length_q=batch["max_length_q"],
                      max_length_k=batch["max_length_k"])
    logits = model.lm_head(out.last_hidden_state)[0, :-1]
    y = batch["labels"][0, 1:]
    return F.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE_INDEX), y


def test_packed_batch_matches_samples_run_one_by_one(model, samples):
    packed = collate_packed(samples, pad_token_id=0)
    assert packed["input_ids"].shape == (1, sum(packed["seq_lens"])) and packed["real_tokens"] == packed["padded_tokens"]
    with torch.no_grad():
        token_losses, y = _per_token_losses(model, packed)
        bounds = packed["cu_seq_lens_q"].tolist()
        for i, s in enumerate(samples):
            a, b = bounds[i], bounds[i + 1]
            # targets of sample i sit at shifted positions a..b-2 (position b-1 would predict sample i+1)
            mask = y[a:b - 1] != IGNORE_INDEX
            packed_loss = token_losses[a:b - 1][mask].mean()
            alone = model(input_ids=s["input_ids"][None], labels=s["labels"][None],
                          pixel_values=None if s["pixel_values"] is None else s["pixel_values"][None]).loss
            assert packed_loss.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-5), f"sample {i}"
        # the boundary position between samples is never a target
        assert all(y[bounds[i + 1] - 1] == IGNORE_INDEX for i in range(len(samples) - 1))


def test_objective_equals_transformers_loss_on_padded_batch(model, samples):
    padded = collate(samples, pad_token_id=0)
    packed = collate_packed(samples, pad_token_id=0)
    objective = LlavaObjective(model)
    with torch.no_grad():
        reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                          labels=padded["labels"], pixel_values=padded["pixel_values"]).loss
        ours = objective(**{k: packed[k] for k in ("input_ids", "labels", "pixel_values", "position_ids",
                                                   "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_positions_found_on_the_host_give_the_masked_loss_and_gradients(model, samples, packed):
    from accelbench.train.stage import model_inputs

    collator = collate_packed if packed else collate
    objective = LlavaObjective(model)
    masked = model_inputs(collator(samples, pad_token_id=0), torch.device("cpu"), torch.float32)
    batch = collator(samples, pad_token_id=0, image_token_id=IMAGE)
    indexed = model_inputs(batch, torch.device("cpu"), torch.float32)
    assert "image_index" not in masked
    assert indexed["image_index"].numel() == 3 * PRESETS["tiny"].vision.image_tokens  # three samples have an image
    assert indexed["target_index"].numel() == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    params = [p for p in model.parameters()]
    results = []
    for inputs in (masked, indexed):
        loss = objective(**inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    (l1, g1), (l2, g2) = results
    assert l2.item() == pytest.approx(l1.item(), rel=1e-6)
    touched = [(a, b) for a, b in zip(g1, g2) if a is not None]
    assert len(touched) == len([b for b in g2 if b is not None]) > 0  # the same parameters get gradients
    for a, b in touched:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # an image whose tokens the collator did not find is an error that says what is missing, not a silent misplace
    short = dict(indexed, image_index=indexed["image_index"][:-1])
    with pytest.raises(ValueError, match="image tokens in the micro-batch but .* image features"):
        objective(**short)


def test_chunked_loss_gradients_match_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 33, 16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 33))
    labels[0, :5] = IGNORE_INDEX
    loss_chunked = selected_cross_entropy(head, hidden, labels, chunk=4)
    g1 = torch.autograd.grad(loss_chunked, [hidden, head.weight])
    ref = F.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    g2 = torch.autograd.grad(ref, [hidden, head.weight])
    assert loss_chunked.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_step_loss_is_the_global_token_mean_over_ranks_and_micro_batches():
    """The gradient DeepSpeed builds from accelbench's per-micro-batch losses (each divided by the accumulation
    steps, then averaged over ranks) is that of the mean over every target token of the step, as the HF
    Trainer's average_tokens_across_devices; not the mean of per-rank means when target counts differ."""
    from accelbench.train.stage import step_token_scale

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    ranks, gas = 2, 2
    lengths = [[40, 7], [90, 25]]  # tokens per micro-batch, per rank: very different target counts
    batches = []
    for r in range(ranks):
        for m in range(gas):
            labels = torch.randint(0, 50, (1, lengths[r][m]))
            labels[0, : lengths[r][m] // 3] = IGNORE_INDEX
            batches.append((r, torch.randn(1, lengths[r][m], 16), labels))
    all_targets = sum(int((y[:, 1:] != IGNORE_INDEX).sum()) for _, _, y in batches)  # as after the all_reduce
    scale = step_token_scale(all_targets, torch.device("cpu"), ranks * gas)
    ours = sum(selected_cross_entropy(head, h, y, num_items=scale) / gas for _, h, y in batches) / ranks
    grad = torch.autograd.grad(ours, head.weight)[0]

    h_all = torch.cat([h[0, :-1] for _, h, _ in batches])
    y_all = torch.cat([y[0, 1:] for _, _, y in batches])
    token_mean = F.cross_entropy(head(h_all), y_all, ignore_index=IGNORE_INDEX)
    assert ours.item() == pytest.approx(token_mean.item(), rel=1e-6)
    assert torch.allclose(grad, torch.autograd.grad(token_mean, head.weight)[0], atol=1e-7)
    one = torch.tensor(1.0)
    rank_means = sum(sum(selected_cross_entropy(head, h, y, num_items=one) for r2, h, y in batches if r2 == r)
                     / sum(int((y[:, 1:] != IGNORE_INDEX).sum()) for r2, _, y in batches if r2 == r)
                     for r in range(ranks)) / ranks
    assert abs(rank_means.item() - token_mean.item()) > 1e-3  # the weighting this replaces differs


def test_both_losses_divide_the_target_sum_by_num_items(model, samples):
    packed = collate_packed(samples, pad_token_id=0)
    inputs = {k: packed[k] for k in ("input_ids", "labels", "pixel_values", "position_ids", "cu_seq_lens_q",
                                     "cu_seq_lens_k", "max_length_q", "max_length_k")}
    targets = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        mean = LlavaObjective(model)(**inputs)
        for loss in ("objective", "hf"):
            scaled = LlavaObjective(model, loss)(**inputs, num_items=torch.tensor(1000.0))
            assert scaled.item() == pytest.approx(mean.item() * targets / 1000, rel=1e-5), loss

"""How long the training loop waits for its next micro-batch at an epoch's start, against the other batches.

Two ways to drive the trainer's DataLoader (packed collation, loader workers, the case's synthetic finetune data),
side by side in one run:
  * one iteration per epoch (persistent workers), as the trainer did before: the iteration starts with nothing
    loaded, so the first batch of each epoch waits for a worker to load it;
  * one iteration over every epoch (``data.EpochAfterEpoch``), as the trainer does now.
Between batches the loop sleeps for ``--step-s``, standing in for the training step. CPU only, under a minute:

    python benchmarks/epoch_boundary.py --case llava1.5-13b --mbs 16 --world 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="llava1.5-13b")
    ap.add_argument("--mbs", type=int, default=16)
    ap.add_argument("--world", type=int, default=2, help="ranks the records are shared by (this runs rank 0)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=0.5)
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from accelbench.cases import get_preset
    from accelbench.train.data import EpochAfterEpoch, LengthGroupedSampler, LlavaDataset, load_records
    from accelbench.train.packing import collate_packed
    from accelbench.train.synth import synthesize

    preset = get_preset(a.case)
    paths = synthesize(Path(tempfile.mkdtemp(prefix="accelbench-epochs-")), image_size=preset.vision.image_size,
                       vocab_size=preset.llm.vocab, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    dataset = LlavaDataset(load_records(str(paths["finetune_json"])), str(paths["image_folder"]), tokenizer,
                           template="vicuna_v1", image_tokens=preset.vision.image_tokens,
                           image_token_id=image_token_id, image_size=preset.vision.image_size, model_max_length=2048)
    collate = partial(collate_packed, pad_token_id=tokenizer.pad_token_id, image_token_id=image_token_id)

    def loader(batch_sampler: object, **kwargs: object) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=a.workers,
                                           collate_fn=collate, prefetch_factor=2, **kwargs)

    def waits_per_epoch_iterations() -> list[list[float]]:
        sampler = LengthGroupedSampler(dataset.modality_lengths, a.mbs, a.world, 0, seed=0, balance_ranks=True)
        data, out = loader(sampler, persistent_workers=True), []
        for epoch in range(a.epochs):
            sampler.set_epoch(epoch)
            out.append(timed(iter(data), len(sampler)))
        return out

    def waits_one_iteration() -> list[list[float]]:
        sampler = LengthGroupedSampler(dataset.modality_lengths, a.mbs, a.world, 0, seed=0, balance_ranks=True)
        batches = iter(loader(EpochAfterEpoch(sampler)))
        return [timed(batches, sampler.batches_per_rank) for _ in range(a.epochs)]

    def timed(batches: object, count: int) -> list[float]:
        waits = []
        for _ in range(count):
            t = time.perf_counter()
            next(batches)
            waits.append(time.perf_counter() - t)
            time.sleep(a.step_s)
        return waits

    print(f"{a.case} finetune, LBS {a.mbs}, rank 0 of {a.world}, {a.workers} workers, a {a.step_s} s step: "
          "the loop's wait for a batch, ms")
    print("| iteration | first batch of epochs 2.. | other batches, median |")
    print("| --- | --- | --- |")
    for name, run in (("one per epoch", waits_per_epoch_iterations), ("one over every epoch", waits_one_iteration)):
        epochs = run()
        firsts = [e[0] * 1e3 for e in epochs[1:]]  # epoch 1's first batch waits in both: nothing ran before it
        others = [w * 1e3 for e in epochs for w in e[1:]]
        print(f"| {name} | {' / '.join(f'{w:.0f}' for w in firsts)} | {statistics.median(others):.1f} |")


if __name__ == "__main__":
    main()

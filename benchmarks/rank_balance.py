"""How evenly the sampler spreads tokens over the ranks of each step, with and without lever "balanced-ranks".

Ranks wait for each other at every ZeRO collective, so a step runs at the pace of the rank with the most tokens;
the figure printed is, per step, the mean rank's tokens over the busiest rank's (1.0: perfectly even). Tokens are
counted exactly (the dataset's own tokenization, image tokens included), on accelbench's synthetic finetune data
for the case, as the GPU runs draw it. CPU only, a few seconds:

    python benchmarks/rank_balance.py --case llava1.5-13b --mbs 16 --world 2 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="llava1.5-13b")
    ap.add_argument("--mbs", type=int, default=16)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--data", help="synthetic data folder to reuse (default: a temporary one)")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from accelbench.cases import get_preset
    from accelbench.train.data import LengthGroupedSampler, LlavaDataset, load_records
    from accelbench.train.synth import synthesize

    preset = get_preset(a.case)
    root = Path(a.data or tempfile.mkdtemp(prefix="accelbench-balance-"))
    paths = synthesize(root, image_size=preset.vision.image_size, vocab_size=preset.llm.vocab, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    records = load_records(str(paths["finetune_json"]))
    dataset = LlavaDataset(records, str(paths["image_folder"]), tokenizer, template="vicuna_v1",
                           image_tokens=preset.vision.image_tokens,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                           image_size=preset.vision.image_size, model_max_length=2048)
    tokens = [len(dataset.encode(r)[0]) for r in records]
    print(f"{a.case} finetune, {len(records)} records, LBS {a.mbs}, {a.epochs} epochs: "
          f"mean rank tokens / busiest rank tokens per step")
    print("| ranks | deal | steps | mean | worst step |")
    print("| --- | --- | --- | --- | --- |")
    for world in a.world:
        for balance in (False, True):
            evenness = []
            for epoch in range(a.epochs):
                per_rank = [LengthGroupedSampler(dataset.modality_lengths, a.mbs, world, r, seed=0, epoch=epoch,
                                                 balance_ranks=balance).rank_batches() for r in range(world)]
                for step in zip(*per_rank):
                    totals = [sum(tokens[i] for i in batch) for batch in step]
                    evenness.append(statistics.mean(totals) / max(totals))
            deal = "by length (balanced-ranks)" if balance else "LLaVA's order"
            print(f"| {world} | {deal} | {len(evenness)} | {statistics.mean(evenness):.3f} | {min(evenness):.3f} |")


if __name__ == "__main__":
    main()

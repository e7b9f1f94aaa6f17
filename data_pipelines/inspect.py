"""Look at what a data config feeds the model, before spending GPU hours on it.

    python -m data_pipelines.inspect                                  # the default (bundled corpus)
    python -m data_pipelines.inspect mixture_example                  # a conf/data/ config by name
    python -m data_pipelines.inspect jsonl_example 'data.sources.0.path=my/*.jsonl' train.seq_len=256
    python -m data_pipelines.inspect --samples 2 --batches 100 --chars 300 data.tokenizer=gpt2

Prints a few decoded packed sequences (documents separated by a marker), token and document counts, the
mixture's realised proportions against its weights, skipped rows, and the validation set's size. Reads as one
data-parallel rank of one (dp 0/1), in this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="a conf/data/ name and/or Hydra overrides (key=value)")
    parser.add_argument("--samples", type=int, default=3, help="packed sequences to decode (default 3)")
    parser.add_argument("--batches", type=int, default=50, help="micro-batches to read for the counts (default 50)")
    parser.add_argument("--chars", type=int, default=600, help="characters shown per sequence (default 600)")
    args = parser.parse_intermixed_args(argv)

    from hydra import compose, initialize_config_dir

    from data_pipelines.packed import DataError
    from data_pipelines.pipeline import StreamingData, describe_stats, prepare_data
    from data_pipelines.tokenizer import load_tokenizer
    from dsv4.config import ConfigError
    from dsv4.training.config import resolve_config

    overrides = [a if "=" in a else f"data={a}" for a in args.config]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=overrides)
        run = resolve_config(cfg)
        run.data.num_workers = 0
        plan = prepare_data(run.data)
        data = StreamingData(plan, run.train.seq_len, run.train.micro_batch_size, run.train.seed, 0, 1)
        tokenizer = load_tokenizer(plan.tokenizer)
        batches = data.batches()
        print(f"data: {plan.describe()}")
        print(f"tokenizer {plan.tokenizer.label} (vocab {plan.vocab_size}, EOS id {plan.eos_id}) | "
              f"sequences of {run.train.seq_len} tokens, micro-batch {run.train.micro_batch_size} | "
              f"cross_document_attention={plan.cross_document_attention}")
        shown = 0
        docs_per_seq: list[int] = []
        for b in range(max(1, args.batches)):
            batch = next(batches)
            for row in range(batch["input_ids"].shape[0]):
                doc_ids = batch["doc_ids"][row]
                docs_per_seq.append(int(doc_ids.max()) + 1)
                if shown < args.samples:
                    shown += 1
                    print(f"\n---- sample {shown} (batch {b}, row {row}): "
                          f"{int(doc_ids.max()) + 1} document segment(s), lengths {doc_ids.bincount().tolist()}, "
                          f"positions start {batch['positions'][row][:3].tolist()}")
                    pieces = []
                    for d in range(int(doc_ids.max()) + 1):
                        ids = batch["input_ids"][row][doc_ids == d].tolist()
                        pieces.append(tokenizer.decode(ids, skip_special_tokens=False))
                    text = " ‖DOC‖ ".join(pieces)
                    print(text[: args.chars] + (" [...]" if len(text) > args.chars else ""))
        data.close()
        stats = data.stats()
        tokens = sum(stats["tokens"].values())
        docs = sum(stats["docs"].values())
        n_seq = len(docs_per_seq)
        print(f"\nread {n_seq} sequences ({n_seq * run.train.seq_len:,} tokens) from {docs:,} documents "
              f"({tokens:,} tokens incl. EOS, {tokens / max(docs, 1):,.0f} per document); "
              f"{sum(docs_per_seq) / max(n_seq, 1):.2f} document segments per sequence")
        print(f"mixture (realised / weight): {describe_stats(stats, plan)}")
        val = data.val_batches(run.train.eval_batches)
        print(f"validation: {sum(v['input_ids'].shape[0] for v in val)} held-out sequences "
              f"(train.eval_batches={run.train.eval_batches})")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

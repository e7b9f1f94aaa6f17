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
from dataclasses import dataclass, fields
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.config import DataConfig, check_data_config
from data_pipelines.packed import DataError
from data_pipelines.pipeline import StreamingData, describe_stats, prepare_data
from data_pipelines.schema import typed
from data_pipelines.tokenizer import load_tokenizer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The train group every run composes (conf/config.yaml: `train: default`): its values are the defaults below, read
# rather than copied, so a composed config without one of these keys still reads as training would.
TRAIN_DEFAULTS = OmegaConf.load(CONF_DIR / "train" / "default.yaml")


@dataclass
class TrainSettings:
    """The train.* keys that shape what the data pipeline produces (defaults: conf/train/default.yaml)."""
    seq_len: int = TRAIN_DEFAULTS.seq_len
    micro_batch_size: int = TRAIN_DEFAULTS.micro_batch_size
    seed: int = TRAIN_DEFAULTS.seed
    eval_batches: int = TRAIN_DEFAULTS.eval_batches


def load_config(overrides: list[str]):
    """(DataConfig, TrainSettings) composed from conf/ like train.py does; every mistake a DataError naming it."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise DataError(f"{' '.join(overrides) or 'config'}: {_hydra_message(str(e))}") from None
    data = typed(DataConfig, cfg.data, "data", DataError)
    check_data_config(data)
    keys = [f.name for f in fields(TrainSettings)]
    train = typed(TrainSettings, OmegaConf.masked_copy(cfg.train, keys), "train", DataError)
    for key in keys:
        if key != "seed" and getattr(train, key) < 1:
            raise DataError(f"train.{key}={getattr(train, key)!r}: must be >= 1")
    return data, train


def _read_by_inspect(key: str) -> bool:
    """Whether an override's key is one this command reads: data (a conf/data/ choice), data.* or TrainSettings'."""
    return key == "data" or key.startswith("data.") or key in {f"train.{f.name}" for f in fields(TrainSettings)}


def _hydra_message(text: str) -> str:
    """Hydra's multi-line error in one line: the problem, and the options it lists (not its search path)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        options = []
        for line in lines[2:]:
            if line.endswith(":"):
                break
            options.append(line)
        return f"{lines[0]} (choose one of: {', '.join(options)})"
    return " ".join(lines[:2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="a conf/data/ name and/or Hydra overrides (key=value)")
    parser.add_argument("--samples", type=int, default=3, help="packed sequences to decode (default 3)")
    parser.add_argument("--batches", type=int, default=50, help="micro-batches to read for the counts (default 50)")
    parser.add_argument("--chars", type=int, default=600, help="characters shown per sequence (default 600)")
    args = parser.parse_intermixed_args(argv)
    if args.samples < 1:
        parser.error(f"--samples={args.samples}: must be >= 1")
    if args.batches < 1:
        parser.error(f"--batches={args.batches}: must be >= 1")
    if args.chars < 0:
        parser.error(f"--chars={args.chars}: must be >= 0 (0: counts only, no text)")
    for arg in args.config:
        if "=" in arg and not _read_by_inspect(arg.split("=", 1)[0].lstrip("+~")):
            print(f"error: {arg}: inspect only reads the data settings (data.*, "
                  f"{', '.join(f'train.{f.name}' for f in fields(TrainSettings))}); this override changes nothing "
                  "here", file=sys.stderr)
            return 2

    overrides = [a if "=" in a else f"data={a}" for a in args.config]
    try:
        data_config, train = load_config(overrides)
        if args.samples > args.batches * train.micro_batch_size:
            print(f"warning: --samples {args.samples}: --batches {args.batches} x micro-batch "
                  f"{train.micro_batch_size} reads only {args.batches * train.micro_batch_size} sequences; give "
                  "more --batches to see them all", file=sys.stderr)
        data_config.num_workers = 0
        plan = prepare_data(data_config)
        data = StreamingData(plan, train.seq_len, train.micro_batch_size, train.seed, 0, 1)
        tokenizer = load_tokenizer(plan.tokenizer)
        batches = data.batches()
        print(f"data: {plan.describe()}")
        print(f"tokenizer {plan.tokenizer.label} (vocab {plan.vocab_size}, EOS id {plan.eos_id}) | "
              f"sequences of {train.seq_len} tokens, micro-batch {train.micro_batch_size} | "
              f"cross_document_attention={plan.cross_document_attention}")
        shown = 0
        docs_per_seq: list[int] = []
        for b in range(args.batches):
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
        print(f"\nread {n_seq} sequences ({n_seq * train.seq_len:,} tokens) from {docs:,} documents "
              f"({tokens:,} tokens incl. EOS, {tokens / max(docs, 1):,.0f} per document); "
              f"{sum(docs_per_seq) / max(n_seq, 1):.2f} document segments per sequence")
        print(f"mixture (realised / weight): {describe_stats(stats, plan)}")
        val = data.val_batches(train.eval_batches)
        print(f"validation: {sum(v['input_ids'].shape[0] for v in val)} held-out sequences "
              f"(train.eval_batches={train.eval_batches})")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

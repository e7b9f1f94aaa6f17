"""The embedded default data feed: a text corpus, tokenized once, packed into fixed-length sequences.

Documents are joined with EOS into one token stream and cut into consecutive sequences of
seq_len + 1 tokens (inputs = [:-1], labels = [1:]). Every 1/val_fraction-th document is held
out for validation. The order of training sequences is a seeded permutation per epoch, and the
sequence a rank reads at (step, micro-step) is a pure function of those numbers, so resuming from a
checkpoint's step continues the exact data order. (Streaming `datasets`, mixtures and per-rank
stream state replace this feed in data_pipelines' streaming pipeline; this module is the seam.)
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_CORPUS = BUNDLED_DIR / "corpus.txt.gz"
BUNDLED_TOKENIZER = BUNDLED_DIR / "tokenizer.json"
DOC_SEPARATOR = "<|doc|>"
EOS_TOKEN = "<|endoftext|>"


class DataError(RuntimeError):
    """Data cannot be read. The message names the file or key."""


def read_documents(path: Path, key: str = "data.path") -> list[str]:
    """Documents of a .txt or .txt.gz file, separated by lines holding exactly <|doc|>."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from None
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip())
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{key}: {path} holds no text")
    return docs


def load_tokenizer(path: Path | None, key: str = "data.tokenizer"):
    from tokenizers import Tokenizer

    path = path or BUNDLED_TOKENIZER
    if not Path(path).is_file():
        raise DataError(f"{key}: tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"{key}: cannot load tokenizer {path}: {e}") from None


def tokenize_documents(docs: list[str], tokenizer, eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class PackedSplit:
    tokens: torch.Tensor  # [num_tokens] int32
    seq_len: int

    @property
    def num_sequences(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def sequence(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.tokens[start: start + self.seq_len + 1].long()


class PackedTextData:
    """Packed train/validation sequences from one text corpus, addressable by (step, micro-step, rank)."""

    def __init__(self, path: str | None, tokenizer_path: str | None, seq_len: int, val_fraction: float,
                 seed: int) -> None:
        corpus = Path(path) if path else BUNDLED_CORPUS
        self.source = str(corpus)
        self.tokenizer = load_tokenizer(Path(tokenizer_path) if tokenizer_path else None)
        eos_id = self.tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"data.tokenizer: the tokenizer has no {EOS_TOKEN} token")
        self.eos_id = eos_id
        self.vocab_size = self.tokenizer.get_vocab_size()
        docs = read_documents(corpus)
        # every stride-th document is held out: corpora are often grouped by source, so a tail would not do
        n_val = max(1, int(len(docs) * val_fraction)) if len(docs) > 1 else 0
        stride = len(docs) // n_val if n_val else len(docs) + 1
        val_ids = set(range(stride - 1, len(docs), stride)[:n_val])
        train_docs = [d for i, d in enumerate(docs) if i not in val_ids]
        val_docs = [d for i, d in enumerate(docs) if i in val_ids]
        self.train = PackedSplit(tokenize_documents(train_docs, self.tokenizer, eos_id), seq_len)
        self.val = PackedSplit(tokenize_documents(val_docs or train_docs[-1:], self.tokenizer, eos_id), seq_len)
        if self.train.num_sequences < 1:
            raise DataError(f"data.path: {corpus} has {len(self.train.tokens)} training tokens, fewer than "
                            f"train.seq_len + 1 = {seq_len + 1}")
        self.seed = seed
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.train.num_sequences, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def train_batch(self, step: int, micro_step: int, grad_accum: int, micro_batch: int, dp_rank: int,
                    dp_world: int) -> dict[str, torch.Tensor]:
        """The micro-batch this data-parallel rank trains on at (step, micro_step): input_ids, labels [b, S]."""
        per_micro = micro_batch * dp_world
        first = ((step * grad_accum + micro_step) * per_micro) + dp_rank * micro_batch
        rows = []
        for sample in range(first, first + micro_batch):
            epoch, offset = divmod(sample, self.train.num_sequences)
            rows.append(self.train.sequence(int(self._permutation(epoch)[offset])))
        return _to_inputs(torch.stack(rows))

    def val_batches(self, num_batches: int, micro_batch: int, dp_rank: int, dp_world: int):
        """Fixed validation micro-batches for this rank (the same every evaluation)."""
        n = self.val.num_sequences
        if n == 0:
            return
        for b in range(num_batches):
            first = (b * dp_world + dp_rank) * micro_batch
            if first >= n:
                return
            rows = [self.val.sequence(i) for i in range(first, min(first + micro_batch, n))]
            yield _to_inputs(torch.stack(rows))


def _to_inputs(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}

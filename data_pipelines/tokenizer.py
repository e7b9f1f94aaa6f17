"""Tokenizers for the data stream: the bundled 4K BPE by default, a tokenizer.json file, a Hub tokenizer name, or
`recall`: a word-level tokenizer of exactly the recall symbols (data_pipelines/recall.py), built in memory.

Loaded once per process (the training process checks it before training; each DataLoader worker loads its
own copy from the same spec)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from data_pipelines.packed import BUNDLED_TOKENIZER, EOS_TOKEN, DataError
from data_pipelines.recall import recall_words

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
RECALL_TOKENIZER = "recall"  # data.tokenizer value that selects recall_tokenizer()


@dataclass(frozen=True)
class TokenizerSpec:
    """What to load: `value` is None (bundled), "recall", a file path, or a Hugging Face Hub tokenizer name."""
    value: str | None = None
    eos_token: str | None = None  # None: the first of EOS_CANDIDATES in the vocabulary

    @property
    def label(self) -> str:
        return self.value or "bundled"


def load_tokenizer(spec: TokenizerSpec) -> Any:
    """A `tokenizers.Tokenizer`; errors name data.tokenizer and say what to do."""
    value = spec.value
    if value == RECALL_TOKENIZER:  # the name wins over a file called `recall` here (give ./recall for that one)
        return recall_tokenizer()
    path = Path(value) if value else BUNDLED_TOKENIZER
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"data.tokenizer: cannot load tokenizer {path}: {e}") from None
    if value is None or value.endswith(".json") or value.startswith((".", "/", "~")):
        raise DataError(f"data.tokenizer: tokenizer file not found: {path}")
    try:
        return Tokenizer.from_pretrained(value)
    except Exception as e:
        raise DataError(f"data.tokenizer={value!r}: not a file here, and loading it from the Hugging Face Hub "
                        f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Give a tokenizer.json path, "
                        "or a Hub name with network access (unset HF_HUB_OFFLINE).") from None


def recall_tokenizer() -> Any:
    """A word-level `tokenizers.Tokenizer` whose ids are recall_words() in order (0..146), EOS last and special.

    Words are split on whitespace (decoding joins them with spaces). There is no unknown token: a word outside the
    recall symbols raises rather than silently becoming some symbol (prepare_data refuses text sources with this
    tokenizer before training).
    It is built in memory; `Tokenizer.save` writes it as a plain tokenizer.json (dsv4.export does), which loads
    back with the same ids."""
    vocab = {word: i for i, word in enumerate(recall_words())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])  # already id 146: marked special only
    return tokenizer


def eos_id_of(tokenizer: Any, spec: TokenizerSpec) -> int:
    """The id of the end-of-document token placed after every document."""
    candidates = (spec.eos_token,) if spec.eos_token else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise DataError(f"data.eos_token: tokenizer {spec.label} has none of {', '.join(candidates)}; "
                    "set data.eos_token to its end-of-text token")

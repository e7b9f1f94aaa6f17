"""The seeded, resumable stream that generated sources share: passkey (passkey.py) and recall (recall.py).

A `SyntheticStream` is one lane's documents with the DocumentStream interface (sources.py: next_document,
state_dict, skipped, exhausted). Its generator is seeded by (seed, lane, num_lanes, split) and a number of the
source's kind, so lanes, splits and kinds never share draws; training is endless and validation a fixed set of
`val_documents`. It resumes exactly from its state (the generator's state and the count), and the state records
the source's settings, so resuming with other settings stops with a message naming the key."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.packed import DataError


class SyntheticStream:
    """One lane's generated documents. A subclass sets `kind` (the source's settings attribute on its SourceSpec,
    and the key of those settings in the saved state), `seed_salt`, and `make_document` (which draws with
    self.rng)."""

    kind: str
    seed_salt: int  # keeps each kind's draws apart for the same seed
    settings_layout: str = ""  # how the settings list reads, appended to the changed-settings message

    def __init__(self, spec: Any, split: str, lane: int, num_lanes: int, *, seed: int,
                 state: dict[str, Any] | None = None) -> None:
        self.spec, self.split, self.settings = spec, split, getattr(spec, self.kind)
        # validation documents come from their own seed stream: never one of the training documents' draws
        self.rng = np.random.default_rng([seed, lane, num_lanes, int(split == "val"), self.seed_salt])
        self.epoch, self.epoch_docs = 0, 0
        self.skipped = {"malformed": 0, "missing_field": 0, "empty": 0}  # sources.SKIP_KINDS: nothing is skipped
        self.exhausted = False
        if state:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        saved = state.get(self.kind)
        if saved != self.settings.as_list():
            raise DataError(f"{self.spec.key}.{self.kind} changed since the checkpoint ({saved} -> "
                            f"{self.settings.as_list()}{self.settings_layout}); the data stream cannot resume "
                            "exactly. Restore it, or start a new run")
        self.rng.bit_generator.state = state["rng"]
        self.epoch_docs = int(state["epoch_docs"])

    def make_document(self) -> Any:
        """The next document, drawn with self.rng."""
        raise NotImplementedError

    def next_document(self) -> Any:
        """The next document; None when the validation set is done."""
        if self.split == "val" and self.epoch_docs >= self.settings.val_documents:
            self.exhausted = True
            return None
        self.epoch_docs += 1
        return self.make_document()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epoch_docs": self.epoch_docs, "hf": None, "skipped": dict(self.skipped),
                "rng": self.rng.bit_generator.state, self.kind: self.settings.as_list()}

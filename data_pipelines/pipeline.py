"""A data-parallel rank's stream of packed training micro-batches, its validation set, and its exact resume.

    prepare_data(data config)      checks sources, tokenizer and EOS before training -> DataPlan
    StreamingData(plan, ..., dp_rank, dp_world)
        .batches()                 micro-batches {input_ids, labels, doc_ids, positions}, each [B, S]; labels
                                   are -100 (ignored) where a source's loss mask drops them (packed.py)
        .state_dict() / .load_state_dict()   the stream position after the last micro-batch handed out
        .val_batches(n)            this rank's share of a fixed held-out set (the same every evaluation)
    save_data_state / load_data_state      one JSON file per rank next to each checkpoint

Lanes and workers. With W = max(1, data.num_workers), a rank reads its data in W "lanes", one per DataLoader
worker; lane k of rank r is node r * W + k of dp_world * W in `split_dataset_by_node`, with its own source
positions, mixture RNG and packing buffer. The DataLoader hands out micro-batches round-robin from workers
0, 1, ..., W-1, so micro-batch i comes from lane i % W. Every micro-batch carries its lane's state right after it
was made; the training process keeps, per lane, the state of the last micro-batch it actually consumed, so
micro-batches that workers prefetched but training never used are not lost: after a resume the lanes start from
the consumed states and worker k runs lane (consumed + k) % W, continuing the same round-robin. Exact resume
therefore needs the same data.num_workers (checked). W = 0 runs one lane in the training process.

Nothing here imports DeepSpeed; the trainer passes dp_rank / dp_world (ranks of one sequence-parallel group
share a dp_rank, so they read the same samples).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.mixture import Mixture
from data_pipelines.packed import DataError, Packer, sequence_tensors
from data_pipelines.recall import TokenDocument
from data_pipelines.sources import SKIP_KINDS, SourceSpec, open_stream, resolve_sources
from data_pipelines.tokenizer import RECALL_TOKENIZER, TokenizerSpec, eos_id_of, load_tokenizer

STATE_VERSION = 1
FINGERPRINT_KEYS = {"seq_len": "train.seq_len", "micro_batch": "train.micro_batch_size", "seed": "data.seed",
                    "dp_world": "the number of data-parallel ranks", "lanes": "data.num_workers",
                    "num_workers": "data.num_workers",
                    "sources": "data.sources", "tokenizer": "data.tokenizer", "val_fraction": "data.val_fraction",
                    "on_bad_row": "data.on_bad_row", "shuffle_buffer": "data.shuffle_buffer",
                    "shuffle_files": "data.shuffle_files", "mix_by": "data.mix_by"}


@dataclass(frozen=True)
class DataPlan:
    """Everything checked before training. Plain values: it pickles into DataLoader workers."""
    sources: tuple[SourceSpec, ...]
    tokenizer: TokenizerSpec
    eos_id: int
    vocab_size: int
    val_fraction: float
    on_bad_row: str
    num_workers: int
    prefetch_factor: int
    worker_start: str  # multiprocessing start method of the DataLoader workers
    shuffle_buffer: int  # packed sequences a lane draws from at random (0: stream order)
    cross_document_attention: bool
    seed: int | None
    shuffle_files: bool = True  # train: each source's files in a new seeded order every epoch
    mix_by: str = "documents"  # what the sources' weights proportion: documents | tokens
    warnings: tuple[str, ...] = ()  # printed by prepare_data (rank 0): trains, but likely not as meant

    def describe(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0].describe()
        total = sum(s.weight for s in self.sources)
        return "mixture of " + ", ".join(f"{s.describe()} {s.weight / total:.2f}" for s in self.sources)


def prepare_data(data: Any) -> DataPlan:
    """Check a DataConfig (dsv4.training.config) before training: sources, tokenizer, EOS. Raises DataError.
    Warnings (a data.path file holding one document) are printed here, once (rank 0; it runs before the process
    group), and kept in the plan."""
    warnings: list[str] = []
    sources = tuple(resolve_sources(data, warnings.append))
    if os.environ.get("RANK", "0") == "0":
        for warning in warnings:
            print(warning, flush=True)
    spec = TokenizerSpec(data.tokenizer, data.eos_token)
    if spec.value == RECALL_TOKENIZER:
        for source in sources:
            if source.kind != "recall":
                raise DataError(f"data.tokenizer=recall: {source.key} ({source.name}) is a {source.kind} source, "
                                "and the recall tokenizer knows only the recall symbols, so its text would not "
                                "tokenize; to mix recall with text keep a text tokenizer (e.g. data.tokenizer=null): "
                                "recall sources then use reserved ids of it (data_pipelines/recall.py)")
    tokenizer = load_tokenizer(spec)
    return DataPlan(sources=sources, tokenizer=spec, eos_id=eos_id_of(tokenizer, spec),
                    vocab_size=tokenizer.get_vocab_size(), val_fraction=float(data.val_fraction),
                    on_bad_row=data.on_bad_row, num_workers=int(data.num_workers),
                    prefetch_factor=int(data.prefetch_factor), worker_start=str(data.worker_start),
                    shuffle_buffer=int(data.shuffle_buffer),
                    cross_document_attention=bool(data.cross_document_attention), seed=data.seed,
                    shuffle_files=bool(data.shuffle_files), mix_by=str(data.mix_by), warnings=tuple(warnings))


class LanePipeline:
    """One lane: sources -> mixture -> tokenize -> pack -> micro-batches. Runs inside a worker (or in-process).

    A source's document is text (tokenized here) or a TokenDocument (ids as they are, and a loss mask that
    packing turns into ignored labels)."""

    def __init__(self, plan: DataPlan, split: str, seq_len: int, micro_batch: int, seed: int, lane: int,
                 num_lanes: int, state: dict[str, Any] | None = None) -> None:
        self.plan, self.split, self.micro_batch = plan, split, micro_batch
        self.tokenizer = load_tokenizer(plan.tokenizer)
        state = state or {}
        self.streams = [
            open_stream(spec, split, lane, num_lanes, seed=seed, val_fraction=plan.val_fraction,
                        on_bad_row=plan.on_bad_row, shuffle_files=plan.shuffle_files,
                        state=(state.get("sources") or [None] * len(plan.sources))[i], tokenizer=self.tokenizer)
            for i, spec in enumerate(plan.sources)]
        self.mixture = Mixture([s.weight for s in plan.sources], [seed, lane, num_lanes, split == "val"],
                               state.get("mixture"), by=plan.mix_by)
        self.packer = Packer(seq_len, state.get("packer"))
        # Training draws each sequence at random from a pool of packed ones, so a micro-batch mixes documents
        # (a long document would otherwise fill it). The pool and its RNG are part of the state: resume is exact.
        self.shuffle = plan.shuffle_buffer if split == "train" else 0
        # raw sequences (tokens, doc_starts, masked; sequences saved before masks existed have no `masked`)
        self.pool: list[dict[str, list[int]]] = list(state.get("pool", []))
        self.pool_rng = np.random.default_rng([seed, lane, num_lanes, 2])
        if state.get("pool_rng"):
            self.pool_rng.bit_generator.state = state["pool_rng"]
        self.batches_made: int = state.get("batches", 0)

    def next_sequence(self) -> dict[str, torch.Tensor] | None:
        """One packed sequence (tensors [S]); None when a validation pass is over."""
        if self.shuffle <= 1:
            raw = self._next_packed()
            return sequence_tensors(raw) if raw is not None else None
        while len(self.pool) < self.shuffle:
            self.pool.append(self._next_packed())  # training streams never end
        pick = int(self.pool_rng.integers(len(self.pool)))
        self.pool[pick], self.pool[-1] = self.pool[-1], self.pool[pick]
        return sequence_tensors(self.pool.pop())

    def _next_packed(self) -> dict[str, list[int]] | None:
        while self.packer.needs_more():
            index = self.mixture.choose()
            if index is None:
                return None
            document = self.streams[index].next_document()
            if document is None:
                self.mixture.deactivate(index)
                continue
            if isinstance(document, TokenDocument):
                ids, loss_mask = document.ids, document.loss_mask
                recalls = list(zip(document.answers, document.sources))
            else:
                ids, loss_mask, recalls = self.tokenizer.encode(document, add_special_tokens=False).ids, None, None
            self.mixture.count(index, len(ids) + 1)
            self.packer.add_document(ids, self.plan.eos_id, loss_mask, recalls)
        return self.packer.pop_raw()

    def next_batch(self) -> dict[str, torch.Tensor]:
        """A training micro-batch: input_ids, labels, doc_ids, positions, each [B, S] int64."""
        rows = [self.next_sequence() for _ in range(self.micro_batch)]
        self.batches_made += 1
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [s.state_dict() for s in self.streams], "mixture": self.mixture.state_dict(),
                "packer": self.packer.state_dict(), "batches": self.batches_made, "pool": list(self.pool),
                "pool_rng": self.pool_rng.bit_generator.state}


class _Opaque:
    """Carries a lane state from a worker untouched (the DataLoader's collation would walk every list in it)."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value


class _LaneDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its lane's pipeline, forever. Errors travel as items, so the training
    process stops with the message instead of a worker traceback."""

    def __init__(self, plan: DataPlan, seq_len: int, micro_batch: int, seed: int, dp_rank: int, dp_world: int,
                 lane_states: list[dict | None], first_lane: int) -> None:
        self.plan, self.seq_len, self.micro_batch, self.seed = plan, seq_len, micro_batch, seed
        self.dp_rank, self.dp_world, self.lane_states, self.first_lane = dp_rank, dp_world, lane_states, first_lane
        self.trainer_pid = os.getpid()  # made in the training process: its workers die with it

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            # the training process stops its workers: a Ctrl-C to the terminal's process group, or a launcher's
            # SIGTERM to the whole process tree, must not kill them while the trainer finishes its step
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _exit_with(self.trainer_pid)
        lanes = len(self.lane_states)
        local = (self.first_lane + (info.id if info is not None else 0)) % lanes
        try:
            # lane `local` of this rank is node dp_rank * lanes + local of dp_world * lanes
            node, nodes = self.dp_rank * lanes + local, self.dp_world * lanes
            pipe = LanePipeline(self.plan, "train", self.seq_len, self.micro_batch, self.seed, node, nodes,
                                self.lane_states[local])
            while True:
                batch = pipe.next_batch()
                yield {**batch, "_lane": local, "_state": _Opaque(pipe.state_dict())}
        except Exception as e:  # DataError or anything unexpected: report it, do not print a worker traceback
            msg = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            yield {"_lane": local, "_error": msg}


def _exit_with(trainer_pid: int) -> None:
    """Make this data worker exit as soon as the training process is gone, however it died (kill -9, a second
    Ctrl-C). The worker ignores SIGINT and SIGTERM, and the DataLoader's own watchdog watches the worker's parent,
    which under forkserver is the forkserver, not the trainer; the forkserver in turn only exits when every holder of
    its "alive" pipe is gone, and the workers hold it: without this both survive the trainer as orphans. Once the
    workers exit, the forkserver sees the pipe close and exits too."""
    if sys.platform.startswith("linux") and os.getppid() == trainer_pid:  # fork / spawn: the kernel does it
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    try:
        pidfd = os.pidfd_open(trainer_pid)  # readable when the process ends; immune to pid reuse
    except ProcessLookupError:
        os._exit(1)  # the trainer died before this worker started
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while True:
                try:
                    os.kill(trainer_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


_OPEN_STREAMS: weakref.WeakSet[StreamingData] = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Stop the workers of every stream still open when the process exits. The workers ignore SIGTERM (see
    _LaneDataset.__iter__), so multiprocessing's own exit hook, which terminates and then joins them, would wait
    forever; this hook is registered after it (torch imports multiprocessing first), so it runs before it and stops
    them the DataLoader's way (its done event), which they obey."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


def _stop_workers(items: Iterator) -> None:
    """Shut a DataLoader iterator's workers down the DataLoader's way (its done event, then a join)."""
    shutdown = getattr(items, "_shutdown_workers", None)  # absent without workers
    if shutdown is not None:
        shutdown()


class StreamingData:
    """A data-parallel rank's training stream and validation set."""

    def __init__(self, plan: DataPlan, seq_len: int, micro_batch: int, seed: int, dp_rank: int = 0,
                 dp_world: int = 1) -> None:
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"data: dp_rank {dp_rank} is not in [0, {dp_world})")
        self.plan, self.seq_len, self.micro_batch = plan, seq_len, micro_batch
        self.seed = plan.seed if plan.seed is not None else seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.lanes = max(1, plan.num_workers)
        self._lane_states: list[dict | None] = [None] * self.lanes  # each lane's state after its last batch
        self._consumed = 0  # micro-batches handed to training
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        self._val: list[dict[str, torch.Tensor]] | None = None

    @property
    def vocab_size(self) -> int:
        return self.plan.vocab_size

    @property
    def cross_document_attention(self) -> bool:
        return self.plan.cross_document_attention

    # ---------------------------------------------------------------- training stream

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches for this rank, from the current state on (endless)."""
        if self._iterator is None:
            self._iterator = self._generate()
            _OPEN_STREAMS.add(self)
        return self._iterator

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _LaneDataset(self.plan, self.seq_len, self.micro_batch, self.seed, self.dp_rank, self.dp_world,
                               list(self._lane_states), self._consumed % self.lanes)
        workers = self.plan.num_workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             prefetch_factor=self.plan.prefetch_factor if workers else None,
                                             multiprocessing_context=self.plan.worker_start if workers else None)
        items = iter(loader)
        try:
            while True:
                try:
                    item = next(items)
                except StopIteration:  # a lane's worker ended without a batch: only after an error item
                    raise DataError(f"rank {self.dp_rank}: the data workers stopped") from None
                except RuntimeError as e:  # a worker killed (e.g. out of memory) or a worker start failure
                    raise DataError(f"rank {self.dp_rank}: a data worker failed: {str(e).splitlines()[0]}") from None
                if "_error" in item:
                    where = f"data worker {item['_lane']}" if workers else "data"
                    raise DataError(f"rank {self.dp_rank}, {where}: {item['_error']}")
                self._lane_states[item.pop("_lane")] = item.pop("_state").value
                self._consumed += 1
                yield item
        finally:  # also when an error item or close() ends it: the workers stop now, not when a traceback that
            _stop_workers(items)  # still holds this frame is freed (they ignore SIGTERM: exit would wait for them)

    def close(self) -> None:
        """Stop the workers (the state stays as it is)."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None
        _OPEN_STREAMS.discard(self)

    # ---------------------------------------------------------------- resumable state

    def _fingerprint(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "micro_batch": self.micro_batch, "seed": self.seed,
                # num_workers itself, not only the lanes (max(1, num_workers)): 0 and 1 make one lane each, and a
                # change between them resumed silently although the README promises a stop naming the key
                "dp_world": self.dp_world, "num_workers": self.plan.num_workers, "lanes": self.lanes,
                "val_fraction": self.plan.val_fraction,
                "on_bad_row": self.plan.on_bad_row, "shuffle_buffer": self.plan.shuffle_buffer,
                "shuffle_files": self.plan.shuffle_files, "mix_by": self.plan.mix_by,
                "tokenizer": self.plan.tokenizer.label,
                "sources": [[s.name, s.kind, s.format, list(s.files), s.hub, s.hub_config, s.split, s.text_field,
                             s.weight] for s in self.plan.sources]}

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last micro-batch handed out by batches() (JSON-able)."""
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "consumed": self._consumed,
                "fingerprint": self._fingerprint(),
                "lanes": list(self._lane_states)}

    def load_state_dict(self, state: dict[str, Any], where: str = "data state") -> None:
        """Continue exactly after the state's last micro-batch. Call before batches()."""
        if self._iterator is not None:
            raise DataError("data: load_state_dict must come before batches()")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: version {state.get('version')} is not {STATE_VERSION}")
        if state.get("dp_rank") != self.dp_rank:
            raise DataError(f"{where}: written by data-parallel rank {state.get('dp_rank')}, read by {self.dp_rank}")
        mine = self._fingerprint()
        # states from before these keys: files in order, mixtures by documents
        saved = {"shuffle_files": False, "mix_by": "documents", **state["fingerprint"]}
        for key, value in saved.items():
            if mine.get(key) != value:
                raise DataError(f"{where}: {FINGERPRINT_KEYS.get(key, key)} changed since the checkpoint "
                                f"({value!r} -> {mine.get(key)!r}); the data stream cannot resume exactly. Restore "
                                "it, or start a new run")
        self._consumed = int(state["consumed"])
        self._lane_states = list(state["lanes"])

    # ---------------------------------------------------------------- realised mixture and skipped rows

    def stats(self) -> dict[str, Any]:
        """This rank's counts so far: documents and tokens per source, skipped rows per source and kind."""
        names = [s.name for s in self.plan.sources]
        docs = dict.fromkeys(names, 0)
        tokens = dict.fromkeys(names, 0)
        skipped = {n: dict.fromkeys(SKIP_KINDS, 0) for n in names}
        for lane in self._lane_states:
            if not lane:
                continue
            for i, name in enumerate(names):
                docs[name] += lane["mixture"]["docs"][i]
                tokens[name] += lane["mixture"]["tokens"][i]
                for kind, n in lane["sources"][i]["skipped"].items():
                    skipped[name][kind] += n
        return {"docs": docs, "tokens": tokens, "skipped": skipped}

    def describe_stats(self) -> str:
        """One line: realised proportions (documents / tokens) and skipped rows, for the console."""
        return describe_stats(self.stats(), self.plan)

    # ---------------------------------------------------------------- validation

    def val_batches(self, num_batches: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the held-out set: up to num_batches micro-batches, the same every call."""
        if self._val is None:
            needed = num_batches * self.dp_world * self.micro_batch
            pipe = LanePipeline(self.plan, "val", self.seq_len, self.micro_batch, self.seed, 0, 1)
            rows = []
            while len(rows) < needed and (row := pipe.next_sequence()) is not None:
                rows.append(row)
            batches = []
            for b in range(num_batches):
                first = (b * self.dp_world + self.dp_rank) * self.micro_batch
                part = rows[first: first + self.micro_batch]
                if not part:
                    break
                batches.append({key: torch.stack([r[key] for r in part]) for key in part[0]})
            self._val = batches
        return self._val


def describe_stats(stats: dict[str, Any], plan: DataPlan) -> str:
    total_docs = sum(stats["docs"].values()) or 1
    total_tokens = sum(stats["tokens"].values()) or 1
    weights = sum(s.weight for s in plan.sources)
    parts = [f"{s.name} docs {stats['docs'][s.name] / total_docs:.3f} "
             f"tokens {stats['tokens'][s.name] / total_tokens:.3f} (weight {s.weight / weights:.3f})"
             for s in plan.sources]
    skipped = [f"{name}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n)
               for name, kinds in stats["skipped"].items() if any(kinds.values())]
    return "; ".join(parts) + (" | skipped " + "; ".join(skipped) if skipped else "")


# ---------------------------------------------------------------- per-rank state files next to checkpoints

def data_state_path(checkpoint_dir: str | Path, rank: int) -> Path:
    """<checkpoint_dir>/<tag>/data_state_rank{R}.json: every rank writes its own (DeepSpeed's client_state is
    written by one rank only)."""
    return Path(checkpoint_dir) / f"data_state_rank{rank}.json"


def save_data_state(data: StreamingData, checkpoint_dir: str | Path, rank: int) -> Path:
    path = data_state_path(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data.state_dict()))
    os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one, never half of one
    return path


def load_data_state(data: StreamingData, checkpoint_dir: str | Path, rank: int) -> None:
    path = data_state_path(checkpoint_dir, rank)
    if not path.is_file():
        raise DataError(f"rank {rank}: no data state {path}; this checkpoint cannot resume the data stream "
                        "exactly (it predates per-rank data state, or the rank count changed)")
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"rank {rank}: cannot read data state {path}: {e}") from None
    data.load_state_dict(state, where=str(path))

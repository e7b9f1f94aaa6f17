"""Sequence parallelism for V4 attention: queries stay sharded by sequence; only compressed entries move.

Each rank of a sequence-parallel (SP) group holds one contiguous shard of every sequence. Per layer:
  - the rank compresses its own tokens (its groups never straddle ranks: shard lengths are multiples of
    every compression ratio in the schedule), then the SP group all-gathers the compressed entries and
    the indexer keys (1/4 and 1/128 of the tokens);
  - each rank passes its last `sliding_window - 1` raw K=V rows (the next rank's window halo) and, for
    CSA, the hidden states of its last group (the next rank's first entry reads their lookback series)
    to the next rank.
Both collectives are autograd functions (all-gather <-> reduce-scatter, shift forward <-> shift back),
and every rank issues them with the same shapes in the same order. The layer sees none of this: it asks a
plan (plan.py: the interface and the single-device plan; sequence.py: the sequence-parallel plan) for its rows
and entries; `plan_for(sp)` is what the model is given. The attention code never imports DeepSpeed.
"""

from dsv4.parallel.collectives import SequenceParallel, all_gather_sequence, shift_to_next_rank
from dsv4.parallel.plan import LOCAL, LocalPlan
from dsv4.parallel.sequence import SequencePlan


def plan_for(sp: SequenceParallel | None) -> LocalPlan | SequencePlan:
    """The plan for one rank: the single-device plan unless the sequence is sharded over several ranks."""
    return SequencePlan(sp) if sp is not None and sp.world > 1 else LOCAL


__all__ = ["LOCAL", "LocalPlan", "SequenceParallel", "SequencePlan", "all_gather_sequence", "plan_for",
           "shift_to_next_rank"]

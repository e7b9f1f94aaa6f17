"""Top-k with the indexer's tie rule: its definition (`topk_recent_first`) and a fast path equal to it bit for bit.

topk_recent_first sorts whole rows (stable, recent first), which costs far more than selecting k of them.
Here torch.topk selects k + 1 per row; its values are exact whatever it does with ties, so:
  - if the k-th and (k+1)-th values differ, the k selected entries are exactly the entries with a value
    >= the k-th: the set is the oracle's. Only their ORDER may differ (topk orders equal values arbitrarily),
    so the k picks are re-sorted by (value descending, index descending): the oracle's order.
  - if they are equal, a tie straddles the cut (exact-zero ReLU scores; rows with fewer visible entries than k,
    whose -inf entries tie): the entries above the k-th value are in, and of those equal to it the most recent
    ones fill the remaining places, as the rule says.
"""

from __future__ import annotations

import torch


def topk_recent_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim with a defined tie rule: equal scores prefer the MORE RECENT entry.

    ReLU scores tie often (exact zeros), and torch.topk breaks ties arbitrarily, differently for
    different input sizes; a fixed rule keeps every implementation choosing the same entries.
    """
    n = scores.shape[-1]
    values, order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True)
    return values[..., :k], (n - 1) - order[..., :k]


def topk_recent_first_fast(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., n] -> (values, indices) [..., k], equal to topk_recent_first(scores, k)."""
    n = scores.shape[-1]
    if k == 0 or k >= n:
        return topk_recent_first(scores, k)
    values, idx = _select(scores.reshape(-1, n), k)
    return values.view(*scores.shape[:-1], k), idx.view(*scores.shape[:-1], k)


def _select(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, n], k < n -> topk_recent_first(scores, k)."""
    values, idx = torch.topk(scores, k + 1, dim=-1)  # descending; equal values in no defined order
    tied = values[:, k - 1] == values[:, k]  # the cut goes through a tie: the rule picks
    values, idx = values[:, :k], idx[:, :k]
    rows = tied.nonzero()[:, 0]
    if rows.numel():
        tied_scores = scores[rows]
        idx[rows] = _keep_recent_ties(tied_scores, values[rows, -1], k)
        values[rows] = tied_scores.gather(-1, idx[rows])
    return _oracle_order(values, idx)


def _keep_recent_ties(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """scores [R, n] whose k-th largest value kth [R] is tied with the (k+1)-th -> the k kept indices [R, k]
    (ascending): every entry above kth, then the most recent entries equal to it."""
    above = scores > kth[:, None]
    equal = scores == kth[:, None]
    places = k - above.sum(-1, keepdim=True)  # >= 1
    equal_from_here_on = equal.flip(-1).cumsum(-1).flip(-1)  # tied entries at this index or later
    keep = above | (equal & (equal_from_here_on <= places))  # exactly k per row
    return keep.nonzero()[:, 1].view(-1, k)


def _oracle_order(values: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order k picks as topk_recent_first does: value descending, equal values most recent first."""
    idx, order = idx.sort(dim=-1, descending=True)  # recent first (indices are distinct) ...
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)  # ... then by value, keeping that order
    return values, idx.gather(-1, order)

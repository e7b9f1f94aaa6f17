"""The recall evaluation (dsv4/evaluation/recall.py): a model that reads the answer scores 1.0, a blind guesser scores
chance; bucket counts add up to the answers; distances are what the documents say; the indexer hit rate is read off
the real model's picks."""

import math

import pytest
import torch
from tokenizers import Tokenizer

from data_pipelines.packed import BUNDLED_TOKENIZER
from data_pipelines.recall import RecallSpec, Symbols
from dsv4 import build_model
from dsv4.attention import AttentionOptions
from dsv4.evaluation.recall import (
    bucket_edges,
    no_pick_chance,
    recall_documents,
    score_recall,
    set_guess,
    summarise,
)

VOCAB = 4096


class _Reader(torch.nn.Module):
    """Logits that put all mass on the next token (it reads the document ahead) or, blind, on one fixed value."""

    def __init__(self, blind_id: int | None = None) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.options = AttentionOptions()
        self.blind_id = blind_id

    def forward(self, ids):
        target = torch.roll(ids, -1, dims=1) if self.blind_id is None else torch.full_like(ids, self.blind_id)
        return torch.nn.functional.one_hot(target, VOCAB).float() + self.bias

    def indexer_picks(self):
        return {}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(BUNDLED_TOKENIZER))


@pytest.mark.parametrize("task", ["copy", "mqar", "passkey"])
def test_a_reader_scores_one_and_a_blind_guesser_chance(tokenizer, task):
    spec = RecallSpec(task=task, items=6, num_values=8, gap=20, gap_max=70)
    docs = recall_documents(spec, tokenizer, 200, seed=3)
    eos = tokenizer.token_to_id("<|endoftext|>")
    window, reach = 16, 60
    oracle = summarise(score_recall(_Reader(), docs, eos, batch_size=17), window, reach, spec)
    assert oracle["accuracy"] == 1.0 and oracle["answers"] == 200 * 6
    assert sum(b["answers"] for b in oracle["buckets"]) == oracle["answers"]
    assert all(b["accuracy"] == 1.0 for b in oracle["buckets"])
    blind_value = Symbols(tokenizer).values[0]
    blind = summarise(score_recall(_Reader(blind_value), docs, eos), window, reach, spec)
    assert blind["chance"] == 1 / 8
    assert abs(blind["accuracy"] - 1 / 8) < 0.04  # 1,200 answers: 4 standard deviations of 0.0095


class _SetGuesser(torch.nn.Module):
    """Knows each document's answers as a set and, at every answer, picks one of those not yet given at random:
    what a model that learned the set but no key -> value binding does (MQAR's elimination plateau)."""

    def __init__(self, docs) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.options = AttentionOptions()
        self.docs = {tuple(d.ids): d for d in docs}
        self.rng = torch.Generator().manual_seed(0)

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, VOCAB)
        for row in range(ids.shape[0]):
            doc = next(d for key, d in self.docs.items() if tuple(ids[row, :len(key)].tolist()) == key)
            left = [doc.ids[a] for a in doc.answers]
            for answer in doc.answers:
                guess = left[int(torch.randint(len(left), (), generator=self.rng))]
                logits[row, answer - 1, guess] = 1.0
                left.remove(doc.ids[answer])
        return logits + self.bias

    def indexer_picks(self):
        return {}


def test_set_guess_is_the_chance_of_picking_among_the_answers_left():
    assert [set_guess([5, 6, 5, 7], i) for i in range(4)] == [2 / 4, 1 / 3, 1 / 2, 1.0]


def test_first_answer_separates_binding_from_guessing_within_the_set(tokenizer):
    """A reader binds (first answer 1.0, every order 1.0); a set guesser scores what set_guess says: above chance
    overall, rising with the order, at 1/items on the first answer."""
    spec = RecallSpec(task="mqar", items=8, num_keys=32, num_values=16, gap=20)
    docs = recall_documents(spec, tokenizer, 300, seed=5)
    eos = tokenizer.token_to_id("<|endoftext|>")
    oracle = summarise(score_recall(_Reader(), docs, eos), 16, 60, spec)
    assert oracle["first_answer"]["accuracy"] == 1.0 and oracle["by_order"] == [1.0] * 8
    guesser = summarise(score_recall(_SetGuesser(docs), docs, eos), 16, 60, spec)
    first = guesser["first_answer"]
    assert first["answers"] == 300 and 1 / 8 <= first["set_guesser"] < 0.2  # values repeat: a little above 1/8
    assert abs(first["accuracy"] - first["set_guesser"]) < 0.08  # 300 answers: 4 standard deviations of 0.02
    assert abs(guesser["accuracy"] - guesser["set_guesser"]) < 0.04  # 2,400 answers
    assert guesser["accuracy"] > 3 * guesser["chance"] and guesser["by_order"][-1] == 1.0


def test_distances_and_buckets_follow_the_documents(tokenizer):
    spec = RecallSpec(task="copy", items=5, gap=30)
    docs = recall_documents(spec, tokenizer, 4, seed=0)
    records = score_recall(_Reader(), docs, tokenizer.token_to_id("<|endoftext|>"))
    assert {r["distance"] for r in records} == {5 + 30}  # the query (one before the answer) to its source
    result = summarise(records, window=16, reach=3 * 15, spec=spec)
    assert [b["name"] for b in result["buckets"]] == ["2-4 W"]
    assert result["beyond_reach"]["answers"] == 0  # 35 <= 45
    assert bucket_edges(16, 35) == [0, 16, 32, 64]


def test_same_seed_same_documents_other_seed_others(tokenizer):
    spec = RecallSpec()
    a = recall_documents(spec, tokenizer, 3, seed=0)
    assert [d.ids for d in a] == [d.ids for d in recall_documents(spec, tokenizer, 3, seed=0)]
    assert [d.ids for d in a] != [d.ids for d in recall_documents(spec, tokenizer, 3, seed=1)]


def test_random_pick_chance():
    assert no_pick_chance(10, 2, 3) == pytest.approx(math.comb(8, 3) / math.comb(10, 3))
    assert no_pick_chance(4, 1, 8) == 0.0  # k >= visible: every entry is picked
    assert no_pick_chance(10, 0, 3) == 1.0


def test_indexer_hit_rate_reads_the_models_picks(tokenizer):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
               head_dim=32, qk_rope_head_dim=8, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=8,
               compress_ratios=[0, 4], index_n_heads=2, index_head_dim=16, index_topk=2)
    model = build_model(cfg, backend="torch", phase="sparse")
    spec = RecallSpec(task="mqar", items=4, gap=40)
    docs = recall_documents(spec, tokenizer, 6, seed=0)
    records = score_recall(model, docs, tokenizer.token_to_id("<|endoftext|>"))
    assert all("hit1" in r and "hit0" not in r for r in records)  # layer 1 is the CSA layer
    # the same picks, read by hand: the query's top-k against the entries that pooled the source
    model.options.keep_picks = True
    picks = None
    with torch.no_grad():
        model(torch.tensor([docs[0].ids]))
        picks = model.indexer_picks()[1][0]
    model.options.keep_picks = False
    for record, answer, source in zip(records, docs[0].answers, docs[0].sources):
        query = answer - 1
        containing = {source // 4, source // 4 + 1} & set(range((query + 1) // 4))
        assert record["hit1"] == bool(containing & set(picks[query].tolist()))
    result = summarise(records, 8, 14, spec)
    assert 0.0 <= result["indexer_hit_rate"]["1"]["hit_rate"] <= 1.0
    assert 0.0 < result["indexer_hit_rate"]["1"]["chance"] < 1.0
    # in the dense phase there are no picks, hence no hit rate
    model.set_attention_options(phase="dense")
    assert "indexer_hit_rate" in summarise(score_recall(model, docs, 0), 8, 14, spec)
    assert not summarise(score_recall(model, docs, 0), 8, 14, spec)["indexer_hit_rate"]

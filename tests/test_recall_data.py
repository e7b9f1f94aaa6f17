"""The recall source (data_pipelines/recall.py) in the data pipeline: its documents answer where they say, at the
distances asked, reproducibly and resumably; its symbols under the recall and the bundled tokenizer; its loss mask
through packing (labels -100 on every token but the answers) and into the model's loss and gradients; its config
errors naming the key; and a recall run training end to end."""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines import DataError, StreamingData, prepare_data
from data_pipelines.config import RecallConfig, SourceConfig
from data_pipelines.packed import IGNORE_INDEX, Packer, sequence_tensors
from data_pipelines.recall import RecallSpec, RecallStream, Symbols, TokenDocument, make_document, recall_words
from data_pipelines.tokenizer import TokenizerSpec, eos_id_of, load_tokenizer
from dsv4.config import ConfigError
from dsv4.run_config import DataConfig, resolve_config

ROOT = Path(__file__).resolve().parent.parent
RECALL = TokenizerSpec("recall")


@pytest.fixture(scope="module")
def symbols() -> Symbols:
    return Symbols(load_tokenizer(RECALL))


def _docs(spec: RecallSpec, symbols: Symbols, n: int, seed: int = 0) -> list[TokenDocument]:
    rng = np.random.default_rng(seed)
    return [make_document(spec, symbols, rng) for _ in range(n)]


# ---------------------------------------------------------------- the generator

def test_the_config_mirrors_the_spec_field_for_field():
    """RecallConfig is what Hydra checks and RecallSpec what the generator reads: a field added to one only would be
    silently dropped or refused."""
    def shape(cls):
        return [(f.name, f.default) for f in dataclasses.fields(cls)]

    assert shape(RecallConfig) == shape(RecallSpec)


@pytest.mark.parametrize("settings", [
    {"task": "copy", "items": 6, "gap": 5},
    {"task": "mqar", "layout": "aligned", "gap": 7, "filler": "random"},
    {"task": "mqar", "layout": "packed", "items": 12, "num_keys": 12, "gap": 0},
    {"task": "passkey", "items": 5, "gap": 9, "gap_max": 20, "filler": "random"},
    {"task": "mqar", "loss": "all"},
])
def test_every_answer_repeats_its_source_and_only_answers_carry_loss(settings, symbols):
    spec = RecallSpec(**settings)
    spec.check("recall")
    for doc in _docs(spec, symbols, 40):
        assert len(doc.answers) == len(doc.sources) == spec.items
        assert len(doc.loss_mask) == len(doc.ids) <= spec.max_tokens()
        for a, s in zip(doc.answers, doc.sources):
            assert s < a and doc.ids[a] == doc.ids[s]
        if spec.loss == "answers":
            assert [i for i, keep in enumerate(doc.loss_mask) if keep] == sorted(doc.answers)
        else:
            assert all(doc.loss_mask)


@pytest.mark.parametrize("task", ["copy", "passkey"])
def test_copy_and_passkey_answers_lie_the_gap_asked_behind_their_sources(task, symbols):
    """The answer-source distance is items + 1 (the separator / mark) + the gap: `gap` exactly, or every value of
    [gap, gap_max]."""
    items = 4
    for doc in _docs(RecallSpec(task=task, items=items, gap=11), symbols, 20):
        assert {a - s for a, s in zip(doc.answers, doc.sources)} == {items + 1 + 11}
    gaps = set()
    for doc in _docs(RecallSpec(task=task, items=items, gap=3, gap_max=6), symbols, 200):
        distances = {a - s for a, s in zip(doc.answers, doc.sources)}
        assert len(distances) == 1
        gaps.add(distances.pop() - items - 1)
    assert gaps == {3, 4, 5, 6}


def test_mqar_pairs_sit_at_group_multiples_and_every_key_is_asked_once(symbols):
    for group in (4, 5):
        for doc in _docs(RecallSpec(task="mqar", items=6, group=group, gap=9), symbols, 30):
            keys = [doc.ids[s - 1] for s in doc.sources]  # the key before each source value
            assert sorted(s - 1 for s in doc.sources) == [group * k for k in range(6)]
            assert len(set(keys)) == 6 and all(k in symbols.keys for k in keys)
            assert [doc.ids[a - 1] for a in doc.answers] == keys  # each query repeats its pair's key
    for doc in _docs(RecallSpec(task="mqar", items=6, layout="packed", gap=9), symbols, 10):
        assert sorted(doc.sources) == [1, 3, 5, 7, 9, 11]


def test_documents_are_reproducible_from_their_seed(symbols):
    spec = RecallSpec(task="mqar", filler="random", gap=4, gap_max=12)
    assert _docs(spec, symbols, 10, seed=3) == _docs(spec, symbols, 10, seed=3)
    assert _docs(spec, symbols, 10, seed=3) != _docs(spec, symbols, 10, seed=4)


def _spec(recall: RecallConfig | None = None):
    recall = recall or RecallConfig(gap=8, gap_max=16)
    return prepare_data(DataConfig(tokenizer="recall", sources=[SourceConfig(kind="recall", recall=recall)])).sources[0]


def test_a_resumed_stream_continues_with_the_same_documents_and_refuses_other_settings():
    tokenizer = load_tokenizer(RECALL)
    spec = _spec()
    ref = RecallStream(spec, "train", 0, 2, seed=5, tokenizer=tokenizer)
    [ref.next_document() for _ in range(7)]
    state = json.loads(json.dumps(ref.state_dict()))
    ahead = [ref.next_document() for _ in range(5)]
    again = RecallStream(spec, "train", 0, 2, seed=5, tokenizer=tokenizer, state=state)
    assert [again.next_document() for _ in range(5)] == ahead
    other_lane = RecallStream(spec, "train", 1, 2, seed=5, tokenizer=tokenizer)
    assert [other_lane.next_document() for _ in range(5)] != ahead
    val = RecallStream(spec, "val", 0, 1, seed=5, tokenizer=tokenizer)
    assert len([d for d in iter(val.next_document, None)]) == RecallSpec().val_documents and val.exhausted
    with pytest.raises(DataError, match=re.escape("data.sources[0].recall changed")):
        RecallStream(_spec(RecallConfig(gap=9, gap_max=16)), "train", 0, 2, seed=5, tokenizer=tokenizer, state=state)


# ---------------------------------------------------------------- symbols and tokenizers

def test_the_recall_tokenizer_holds_exactly_the_recall_words(tmp_path, symbols):
    tokenizer = load_tokenizer(RECALL)
    words = recall_words()
    assert tokenizer.get_vocab_size() == len(words) == 147
    ids = symbols.keys + symbols.values + symbols.fillers + [symbols.sep, symbols.mark]
    assert ids == list(range(146))
    assert tokenizer.decode(ids).split() == words[:-1]
    assert tokenizer.encode(" ".join(words)).ids == list(range(147))
    assert eos_id_of(tokenizer, RECALL) == 146
    tokenizer.save(str(tmp_path / "tokenizer.json"))  # what dsv4.export writes: the same ids, EOS special
    saved = load_tokenizer(TokenizerSpec(str(tmp_path / "tokenizer.json")))
    assert saved.get_vocab() == tokenizer.get_vocab() and eos_id_of(saved, TokenizerSpec()) == 146
    assert tokenizer.decode([3, 146]) == "k3" and saved.decode([3, 146]) == "k3"
    with pytest.raises(Exception, match="UNK"):  # no unknown token: a stray word is an error, not a symbol
        tokenizer.encode("k3 hello")


def test_with_the_bundled_tokenizer_the_symbols_are_its_last_non_special_ids():
    tokenizer = load_tokenizer(TokenizerSpec())
    s = Symbols(tokenizer)
    ids = s.keys + s.values + s.fillers + [s.sep, s.mark]
    special = set(tokenizer.get_added_tokens_decoder())
    assert len(set(ids)) == 146 and not special & set(ids) and eos_id_of(tokenizer, TokenizerSpec()) not in ids
    assert ids == [i for i in range(tokenizer.get_vocab_size()) if i not in special][-146:]


def test_the_recall_tokenizer_refuses_text_sources_naming_the_key():
    with pytest.raises(DataError, match=re.escape("data.tokenizer=recall: data.sources[1] (books) is a bundled")):
        prepare_data(DataConfig(tokenizer="recall", sources=[SourceConfig(kind="recall"),
                                                             SourceConfig(kind="bundled", name="books")]))
    plan = prepare_data(DataConfig(sources=[SourceConfig(kind="recall"), SourceConfig(kind="bundled")]))
    assert plan.sources[0].describe() == "recall0 (recall mqar, 8 items, gap 64)"  # with the bundled BPE: mixes
    assert _spec().describe() == "recall0 (recall mqar, 8 items, gap 8-16)"


# ---------------------------------------------------------------- the loss mask through packing

def _pack(seq_len: int, docs: list, eos: int, state_every_pop: bool = False) -> list[dict[str, list[int]]]:
    """Every full raw sequence of the documents (ids, or (ids, loss_mask)); optionally rebuilding the packer from its
    JSON state before every pop, as a resumed run does."""
    packer = Packer(seq_len)
    for doc in docs:
        ids, loss_mask = doc if isinstance(doc, tuple) else (doc, None)
        packer.add_document(ids, eos, loss_mask)
    out = []
    while not packer.needs_more():
        if state_every_pop:
            packer = Packer(seq_len, json.loads(json.dumps(packer.state_dict())))
        out.append(packer.pop_raw())
    return out


@pytest.mark.parametrize("seq_len", [5, 16, 33])
def test_packed_labels_keep_exactly_the_answers_and_every_plain_token(seq_len, symbols):
    """Plain text, a masked recall document, plain text: the labels that survive are the plain documents' tokens and
    EOS and the recall document's answers, wherever the sequence boundaries fall (inside the recall document too)."""
    eos = 146
    rng = np.random.default_rng(seq_len)
    plain_a, plain_b = rng.integers(0, 146, 23).tolist(), rng.integers(0, 146, 9).tolist()
    doc = make_document(RecallSpec(task="mqar", items=5, gap=11), symbols, rng)
    docs = [plain_a, (doc.ids, doc.loss_mask), plain_b, plain_a]
    stream = plain_a + [eos] + doc.ids + [eos] + plain_b + [eos] + plain_a + [eos]
    start = len(plain_a) + 1
    kept_expected = set(range(1, start)) | {start + a for a in doc.answers}
    kept_expected |= set(range(start + len(doc.ids) + 1, len(stream)))  # plain_b, plain_a and their EOS
    raws = _pack(seq_len, docs, eos)
    assert len(raws) * seq_len > start + len(doc.ids) + seq_len  # the recall document spans a boundary
    kept = set()
    for k, raw in enumerate(raws):
        t = sequence_tensors(raw)
        assert t["input_ids"].tolist() == stream[k * seq_len: (k + 1) * seq_len]
        for i, label in enumerate(t["labels"].tolist()):
            g = k * seq_len + i + 1  # the stream index of this label's token
            if label != IGNORE_INDEX:
                assert label == stream[g]
                kept.add(g)
    emitted = len(raws) * seq_len
    assert kept == {g for g in kept_expected if g <= emitted}
    assert start + len(doc.ids) not in kept  # the masked document's EOS
    assert _pack(seq_len, docs, eos, state_every_pop=True) == raws  # the packer state round-trips, masks included


@pytest.mark.parametrize("state_every_pop", [False, True])
def test_an_answer_whose_source_fell_into_an_earlier_sequence_loses_its_label(symbols, state_every_pop):
    """A recall document cut by a sequence boundary: its answers whose source is in the same sequence keep their
    label; those whose source went into the previous sequence (no model can recall it there) are masked."""
    eos, seq_len = 146, 48
    rng = np.random.default_rng(5)
    docs = [make_document(RecallSpec(task="mqar", items=6, gap=10), symbols, rng) for _ in range(6)]
    packer = Packer(seq_len)
    for doc in docs:
        packer.add_document(doc.ids, eos, doc.loss_mask, list(zip(doc.answers, doc.sources)))
    stream, answers = [], {}  # stream index of every answer -> its source's stream index
    for doc in docs:
        answers.update({len(stream) + a: len(stream) + s for a, s in zip(doc.answers, doc.sources)})
        stream += doc.ids + [eos]
    kept, cut = set(), 0
    k = 0
    while not packer.needs_more():
        if state_every_pop:
            packer = Packer(seq_len, json.loads(json.dumps(packer.state_dict())))
        labels = sequence_tensors(packer.pop_raw())["labels"].tolist()
        for i, label in enumerate(labels):
            g = k * seq_len + i + 1
            if label != IGNORE_INDEX:
                kept.add(g)
            elif g in answers:
                assert answers[g] < k * seq_len  # masked only because its source is before this sequence
                cut += 1
        k += 1
    emitted = k * seq_len
    assert cut > 0  # the test's boundaries do cut some pairs from their queries
    assert kept == {g for g, src in answers.items() if g <= emitted and src >= (g - 1) // seq_len * seq_len}


def test_a_mask_keeping_everything_is_a_plain_document_and_old_states_mask_nothing():
    ids = list(range(20))
    assert _pack(7, [(ids, [True] * 20), ids], 146) == _pack(7, [ids, ids], 146)
    old = {"tokens": list(range(12)), "doc_starts": [0, 5]}  # a state saved before masks existed
    t = Packer(8, old).pop_sequence()
    assert t["labels"].tolist() == list(range(1, 9))
    assert sequence_tensors({"tokens": list(range(9)), "doc_starts": []})["labels"].tolist() == list(range(1, 9))


def _read(data: StreamingData, n: int) -> list[dict[str, torch.Tensor]]:
    it = data.batches()
    return [next(it) for _ in range(n)]


def test_the_pipeline_resumes_exactly_twice_with_masked_labels_in_its_pool():
    """Through StreamingData (mixture, packer, shuffle pool; the state as JSON): read N, save, read M + K; restored,
    exactly those M; saved and restored again, exactly those K."""
    plan = prepare_data(DataConfig(tokenizer="recall", num_workers=0, shuffle_buffer=4, sources=[
        SourceConfig(kind="recall", recall=RecallConfig(items=4, gap=6, gap_max=20))]))
    ref = StreamingData(plan, 24, 3, 5)
    _read(ref, 3)
    state1 = json.loads(json.dumps(ref.state_dict()))
    assert any(raw.get("masked") for raw in state1["lanes"][0]["pool"])
    rest = _read(ref, 4 + 3)
    ref.close()
    first = StreamingData(plan, 24, 3, 5)
    first.load_state_dict(state1)
    got = _read(first, 4)
    state2 = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = StreamingData(plan, 24, 3, 5)
    second.load_state_dict(state2)
    got += _read(second, 3)
    second.close()
    for a, b in zip(rest, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    labels = torch.cat([b["labels"].flatten() for b in rest])
    kept = labels[labels != IGNORE_INDEX]
    assert 0 < len(kept) < len(labels) / 3 and set(kept.tolist()) <= set(range(64, 128))  # answers: values


# ---------------------------------------------------------------- the loss

TINY = dict(vocab_size=160, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
            head_dim=32, qk_rope_head_dim=8, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=8,
            compress_ratios=[0], index_n_heads=2, index_head_dim=16, index_topk=4)


def _loss_and_grads(model, input_ids, labels):
    model.zero_grad()
    out = model(input_ids, labels=labels)
    out.lm_loss.backward()
    return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_masked_labels_never_reach_the_loss_or_the_gradient(symbols):
    from dsv4 import build_model

    torch.manual_seed(0)
    model = build_model(TINY)
    rng = np.random.default_rng(0)
    spec = RecallSpec(task="copy", items=5, gap=6)
    docs = [(d.ids, d.loss_mask) for d in _docs(spec, symbols, 6)]
    raws = _pack(32, docs, 146)[:2]
    batch = [sequence_tensors(r) for r in raws]
    input_ids, labels = torch.stack([b["input_ids"] for b in batch]), torch.stack([b["labels"] for b in batch])
    out, grads = _loss_and_grads(model, input_ids, labels)
    kept = labels != IGNORE_INDEX
    assert 0 < int(kept.sum()) == int(out.num_tokens) < labels.numel() // 2
    manual = F.cross_entropy(out.logits[kept].float(), labels[kept])  # the mean over the answers alone
    assert torch.allclose(out.lm_loss, manual, atol=1e-6)

    def relabelled(index: int) -> torch.Tensor:
        """The labels packing gives when the stream token at `index` of sequence 0 is another symbol (the inputs
        stay as they are: only that token's role as a label can change anything)."""
        changed = [dict(r, tokens=list(r["tokens"])) for r in raws]
        changed[0]["tokens"][index] = (changed[0]["tokens"][index] + 1 + int(rng.integers(100))) % 146
        return torch.stack([sequence_tensors(r)["labels"] for r in changed])

    masked_index = raws[0]["masked"][len(raws[0]["masked"]) // 2]
    out2, grads2 = _loss_and_grads(model, input_ids, relabelled(masked_index))
    assert torch.equal(out2.lm_loss, out.lm_loss) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    kept_index = int(kept[0].nonzero()[0]) + 1  # control: a kept label does change the loss
    out3, _ = _loss_and_grads(model, input_ids, relabelled(kept_index))
    assert not torch.equal(out3.lm_loss, out.lm_loss)


def test_without_a_mask_the_loss_is_the_plain_loss_and_no_labels_give_zero_not_nan(symbols):
    from dsv4 import build_model

    torch.manual_seed(1)
    model = build_model(TINY)
    docs = _docs(RecallSpec(task="mqar", items=3, gap=5, loss="all"), symbols, 4)
    raw = _pack(24, [(d.ids, d.loss_mask) for d in docs], 146)[0]
    assert raw["masked"] == [] and raw == _pack(24, [d.ids for d in docs], 146)[0]
    t = sequence_tensors(raw)
    input_ids, labels = t["input_ids"][None], t["labels"][None]
    out = model(input_ids, labels=labels)
    assert torch.allclose(out.lm_loss, F.cross_entropy(out.logits[0].float(), torch.tensor(raw["tokens"][1:])),
                          atol=1e-6)
    out, grads = _loss_and_grads(model, input_ids, torch.full_like(labels, IGNORE_INDEX))  # a micro-batch of no answer
    assert out.lm_loss.item() == 0.0 and out.num_tokens.item() == 0
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- config errors and a run

@pytest.mark.parametrize("override,key", [
    ("data.sources.0.recall.task=foo", "data.sources[0].recall.task"),
    ("data.sources.0.recall.gap_max=10", "data.sources[0].recall.gap_max"),
    ("data.sources.1.recall.items=40", "data.sources[1].recall.items"),  # mqar: more pairs than its 32 keys
    ("data.sources.0.recall.num_values=1", "data.sources[0].recall.num_values"),
    ("+data.sources.0.path=x.txt", "data.sources[0].path"),
])
def test_bad_recall_settings_name_the_key(override, key):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=["+experiment=recall", override])
    with pytest.raises(ConfigError, match=re.escape(key)):
        resolve_config(cfg)


def test_a_recall_run_trains_and_reloads_with_its_tokenizer(tmp_path):
    """train.py +experiment=recall for 2 steps (answer-only losses, finite), then load_model on the run directory:
    the recall tokenizer with the same ids."""
    from dsv4.loading import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_training import env, metrics

    out = tmp_path / "run"
    args = ["+experiment=recall", "train.steps=2", "train.micro_batch_size=4", "train.eval_batches=1",
            "train.warmup_steps=1", "logging.interval=1", "logging.wandb.enabled=false", "deepspeed=zero1",
            f"train.output_dir={out}"]
    res = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(2), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "mqar (recall mqar, 8 items, gap 64-96) 0.33" in res.stdout  # the experiment's mixture of three tasks
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["lm_loss"]) for m in steps)
    loaded = load_model(out)
    assert loaded.eos_id == 146 and loaded.config.vocab_size == 160
    assert [loaded.tokenizer.token_to_id(w) for w in recall_words()] == list(range(147))

"""The passkey task and its training source: prompts hold the key where they say, at the lengths and depths asked,
identically for every model; an oracle that reads the key from the prompt scores 1.0 and a guesser that never sees
it scores at chance; the `passkey` data source generates such documents and resumes exactly like the others."""

import json
import re

import datasets
import numpy as np
import pytest

from data_pipelines import DataError, StreamingData, prepare_data
from data_pipelines.corpus import bundled_split
from data_pipelines.packed import BUNDLED_CORPUS
from data_pipelines.passkey import QUESTION, passkey_parts, split_at_depth
from data_pipelines.tokenizer import TokenizerSpec, load_tokenizer
from dsv4.config import ConfigError
from dsv4.evaluation.passkey import passkey_prompts, score_answer, score_passkey
from dsv4.run_config import DataConfig, PasskeyConfig, SourceConfig, resolve_config

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
LENGTHS, DEPTHS = [64, 128, 256], [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerSpec())


@pytest.fixture(scope="module")
def filler_docs():
    return list(bundled_split(str(BUNDLED_CORPUS), 0.02)[1])


def test_prompts_hold_the_key_where_they_say_at_the_lengths_and_depths_asked(tokenizer, filler_docs):
    prompts = passkey_prompts(tokenizer, filler_docs, LENGTHS, DEPTHS, per_cell=3, digits=5, seed=7)
    assert sorted({(p.length, p.depth) for p in prompts}) == sorted((n, d) for n in LENGTHS for d in DEPTHS)
    assert all(sum(1 for q in prompts if (q.length, q.depth) == (p.length, p.depth)) == 3 for p in prompts)
    question = tokenizer.encode(QUESTION, add_special_tokens=False).ids
    for p in prompts:
        needle, _, answer = passkey_parts(tokenizer, p.key)
        assert len(p.ids) == p.length
        assert len(p.key) == 5 and p.key[0] != "0"
        assert p.ids[p.needle_start: p.needle_start + p.needle_len] == needle
        assert tokenizer.decode(needle).count(p.key) == 2
        assert p.ids[-len(question):] == question and p.answer == answer
        num_filler = p.length - len(needle) - len(question)
        assert p.needle_start == split_at_depth(num_filler, p.depth)
        if p.depth == 0.0:
            assert p.needle_start == 0
        if p.depth == 1.0:
            assert p.ids[p.needle_start + p.needle_len:] == question
        assert p.key not in tokenizer.decode(p.ids[: p.needle_start] + p.ids[p.needle_start + p.needle_len:])
    assert len({p.key for p in prompts}) > len(prompts) // 2  # keys vary
    # the same prompts for every model: they depend on (tokenizer, seed, lengths, depths, count) only
    again = passkey_prompts(load_tokenizer(TokenizerSpec()), filler_docs, LENGTHS, DEPTHS, per_cell=3, digits=5,
                            seed=7)
    assert [p.ids for p in again] == [p.ids for p in prompts]
    other = passkey_prompts(tokenizer, filler_docs, LENGTHS, DEPTHS, per_cell=3, digits=5, seed=8)
    assert [p.ids for p in other] != [p.ids for p in prompts]
    with pytest.raises(ValueError, match="too short"):
        passkey_prompts(tokenizer, filler_docs, [10], [0.5], per_cell=1)


def test_an_oracle_scores_one_and_a_model_that_never_sees_the_key_scores_chance(tokenizer, filler_docs):
    prompts = passkey_prompts(tokenizer, filler_docs, [64, 128], [0.0, 0.25, 0.5, 0.75, 1.0], per_cell=15, seed=3)

    def oracle(batch, n_new):  # copies the key from the prompt's text
        keys = [re.search(r"The pass key is (\d+)", tokenizer.decode(list(ids))).group(1) for ids in batch]
        return [tokenizer.encode(" " + key, add_special_tokens=False).ids[:n_new] for key in keys]

    rng = np.random.default_rng(0)

    def blind(batch, n_new):  # guesses digits, never looking at the prompt
        return [tokenizer.encode(" " + "".join(map(str, rng.integers(0, 10, 5))), add_special_tokens=False).ids
                for _ in batch]

    best = score_passkey(tokenizer, prompts, oracle)
    assert best["exact"] == 1.0 and best["per_digit"] == 1.0
    assert all(cell["exact"] == 1.0 for cell in best["by_length_depth"].values())
    assert set(best["by_length"]) == {"64", "128"} and best["by_length"]["64"]["n"] == 75
    guess = score_passkey(tokenizer, prompts, blind)
    assert guess["exact"] == 0.0  # chance 1e-5 per prompt
    assert abs(guess["per_digit"] - guess["chance"]["per_digit"]) < 0.04  # 750 digits: 3.5 standard deviations
    assert score_answer(tokenizer, tokenizer.encode(" 12399", add_special_tokens=False).ids, "12345") == (False, 0.6)


def _plan(passkey: PasskeyConfig, workers: int = 0):
    return prepare_data(DataConfig(sources=[SourceConfig(kind="bundled", name="books", weight=0.5),
                                            SourceConfig(kind="passkey", name="keys", weight=0.5, passkey=passkey)],
                                   num_workers=workers, mix_by="tokens"))


def _read(data, n):
    it = data.batches()
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(all(bool((x[k] == y[k]).all()) for k in x) for x, y in zip(a, b))


def test_the_passkey_source_resumes_exactly_twice(tokenizer):
    """As the other sources (test_data_pipeline.py): read N, save, read M + K; restored, exactly those M; saved and
    restored again, exactly those K. The documents are passkey documents of the configured lengths. (DataLoader
    workers carry any source's lane state the same way: test_data_pipeline.py resumes with workers.)"""
    workers = 0
    passkey = PasskeyConfig(digits=4, min_tokens=40, max_tokens=90)
    plan = _plan(passkey, workers)
    ref = StreamingData(plan, 64, 3, 5)
    _read(ref, 4)
    state1 = json.loads(json.dumps(ref.state_dict()))
    rest = _read(ref, 6 + 5)
    ref.close()
    first = StreamingData(plan, 64, 3, 5)
    first.load_state_dict(state1)
    assert _same(_read(first, 6), rest[:6])
    state2 = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = StreamingData(plan, 64, 3, 5)
    second.load_state_dict(state2)
    assert _same(_read(second, 5), rest[6:])
    second.close()
    text = "".join(tokenizer.decode(b["input_ids"].flatten().tolist(), skip_special_tokens=False) for b in rest)
    found = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key", text)
    assert found and all(a == b and len(a) == 4 for a, b in found)
    assert ref.stats()["docs"]["keys"] > 0
    # other passkey settings cannot resume this stream: the error names the key
    changed = StreamingData(_plan(PasskeyConfig(digits=5, min_tokens=40, max_tokens=90), workers), 64, 3, 5)
    changed.load_state_dict(state2)
    with pytest.raises(DataError, match=r"data.sources\[1\].passkey changed"):
        _read(changed, 1)
    changed.close()


def test_passkey_documents_lengths_answer_and_validation_set(tokenizer):
    from data_pipelines.sources import open_stream

    plan = prepare_data(DataConfig(sources=[SourceConfig(kind="passkey", passkey=PasskeyConfig(
        min_tokens=100, max_tokens=200, val_documents=5))]))
    stream = open_stream(plan.sources[0], "train", 0, 1, seed=1, val_fraction=0.02, on_bad_row="skip",
                         tokenizer=tokenizer)
    for _ in range(20):
        text = stream.next_document()
        key = re.search(r"The pass key is (\d+)\.", text).group(1)
        assert text.endswith(QUESTION.strip() + " " + key)
        assert 90 <= len(tokenizer.encode(text).ids) <= 210  # re-encoding the joined text moves a few tokens
    val = open_stream(plan.sources[0], "val", 0, 1, seed=1, val_fraction=0.02, on_bad_row="skip",
                      tokenizer=tokenizer)
    docs = [val.next_document() for _ in range(6)]
    assert all(d is not None for d in docs[:5]) and docs[5] is None
    again = open_stream(plan.sources[0], "val", 0, 1, seed=1, val_fraction=0.02, on_bad_row="skip",
                        tokenizer=tokenizer)
    assert [again.next_document() for _ in range(5)] == docs[:5]


@pytest.mark.parametrize("override,key", [
    ("data.sources.1.passkey.max_tokens=10", "data.sources[1].passkey.max_tokens"),
    ("data.sources.1.passkey.digits=0", "data.sources[1].passkey.digits"),
    ("data.sources.1.passkey.val_documents=0", "data.sources[1].passkey.val_documents"),
])
def test_bad_passkey_settings_name_the_key(override, key, repo_root):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "conf")):
        cfg = compose("config", overrides=["+experiment=quality", override])
    with pytest.raises(ConfigError, match=re.escape(key)):
        resolve_config(cfg)

"""The streaming data pipeline on real `datasets` streams over small local files: packing (document ids,
positions, no token lost or duplicated), DP sharding, exact resume (twice, with workers, 2 DP ranks, mixtures),
mixture proportions, bad input, the inspect CLI and the data config keys."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from data_pipelines import DataError, StreamingData, load_data_state, prepare_data, save_data_state
from data_pipelines.packed import Packer
from data_pipelines.pipeline import LanePipeline
from data_pipelines.sources import DocumentStream, is_held_out
from data_pipelines.tokenizer import load_tokenizer
from dsv4.config import ConfigError
from dsv4.run_config import DataConfig, SourceConfig, resolve_config

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # shuffled/finished parquet iterators otherwise sleep 5 s

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def doc_text(tag: str, i: int) -> str:
    """A document with a unique id and a length that varies from a few to a few hundred tokens."""
    n = 3 + (i * 37) % 90
    return f"{tag}-{i:05d} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def write_jsonl(path: Path, tag: str, start: int, count: int) -> list[str]:
    docs = [doc_text(tag, i) for i in range(start, start + count)]
    path.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    return docs


def write_parquet(path: Path, tag: str, start: int, count: int) -> list[str]:
    docs = [doc_text(tag, i) for i in range(start, start + count)]
    pq.write_table(pa.table({"text": docs, "id": list(range(count))}), path, row_group_size=17)
    return docs


@pytest.fixture
def corpus(tmp_path) -> dict:
    """4 jsonl shards (120 docs), 3 parquet shards (90 docs), one text file per document (12)."""
    jsonl = [d for k in range(4) for d in write_jsonl(tmp_path / f"a{k}.jsonl", "J", k * 30, 30)]
    parquet = [d for k in range(3) for d in write_parquet(tmp_path / f"p{k}.parquet", "P", k * 30, 30)]
    (tmp_path / "txt").mkdir()
    texts = []
    for i in range(12):
        texts.append(doc_text("T", i))
        (tmp_path / "txt" / f"t{i:02d}.txt").write_text(texts[-1])
    return {"dir": tmp_path, "jsonl": jsonl, "parquet": parquet, "text": texts}


def files(path, **kw) -> SourceConfig:
    return SourceConfig(kind="files", path=str(path), **kw)


def plan_of(*sources: SourceConfig, **kw):
    return prepare_data(DataConfig(sources=list(sources), **kw))


def read(data: StreamingData, n: int) -> list[dict]:
    it = data.batches()
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what a state file holds


# ---------------------------------------------------------------- packing

def test_packer_doc_ids_positions_and_carry():
    p = Packer(seq_len=6)
    p.add_document([10, 11, 12], eos_id=0)  # 10 11 12 EOS
    p.add_document([20, 21], eos_id=0)  # 20 21 EOS
    p.add_document([30, 31, 32, 33], eos_id=0)
    s = p.pop_sequence()
    assert s["input_ids"].tolist() == [10, 11, 12, 0, 20, 21]
    assert s["labels"].tolist() == [11, 12, 0, 20, 21, 0]
    assert s["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1]
    assert s["positions"].tolist() == [0, 1, 2, 3, 0, 1]
    assert p.needs_more()  # 6 tokens left, 7 needed
    p.add_document([40], eos_id=0)
    s = p.pop_sequence()  # starts with the carried EOS of doc 2 (a continuation: position 0 of segment 0)
    assert s["input_ids"].tolist() == [0, 30, 31, 32, 33, 0]
    assert s["labels"].tolist() == [30, 31, 32, 33, 0, 40]
    assert s["doc_ids"].tolist() == [0, 1, 1, 1, 1, 1]
    assert s["positions"].tolist() == [0, 0, 1, 2, 3, 4]
    restored = Packer(6, roundtrip(p.state_dict()))
    assert restored.tokens == p.tokens and restored.doc_starts == p.doc_starts


def test_packing_loses_and_duplicates_no_token_over_an_epoch(corpus):
    """Every document of the epoch (minus the hash-held-out ones), in order, with EOS, exactly once; doc_ids and
    positions restart exactly where a document starts."""
    plan = plan_of(files(corpus["dir"] / "a*.jsonl"), val_fraction=0.1, num_workers=0, shuffle_buffer=0,
                   shuffle_files=False)
    tok = load_tokenizer(plan.tokenizer)
    train_docs = [d for d in corpus["jsonl"] if not is_held_out(d, 0.1)]
    assert 0 < len(train_docs) < len(corpus["jsonl"])
    expected = []
    for d in train_docs:
        expected += tok.encode(d, add_special_tokens=False).ids + [plan.eos_id]
    lane = LanePipeline(plan, "train", 32, 1, 0, 0, 1)
    stream: list[int] = []
    while lane.streams[0].epoch == 0:
        seq = lane.next_sequence()
        if not stream:
            stream.append(int(seq["input_ids"][0]))
        stream += seq["labels"].tolist()
        ids, doc_ids, pos = seq["input_ids"], seq["doc_ids"], seq["positions"]
        starts = torch.zeros(32, dtype=torch.bool)
        starts[0] = True
        starts[1:] = ids[:-1] == plan.eos_id  # a new document starts right after an EOS
        assert torch.equal(doc_ids, torch.cumsum(starts.long(), 0) - 1)
        assert torch.equal(pos == 0, starts)
        assert torch.all(pos[1:][~starts[1:]] == pos[:-1][~starts[1:]] + 1)
    # the stream is the epoch's tokens in order, then epoch 1 begins: nothing lost, nothing repeated
    assert stream[: len(expected)] == expected
    assert len(stream) - len(expected) < 32 + 200  # at most the sequence that crossed into epoch 1


# ---------------------------------------------------------------- sources and DP sharding

@pytest.mark.parametrize("pattern,key", [("a*.jsonl", "jsonl"), ("p[01].parquet", "parquet"),
                                         ("a[012].jsonl", "jsonl"), ("txt/*.txt", "text")])
def test_dp_ranks_split_an_epoch_disjointly_and_completely(corpus, pattern, key):
    """split_dataset_by_node over 2 ranks (by shards when they divide evenly, else by examples): no document
    is read by both ranks, none is lost."""
    spec = plan_of(files(corpus["dir"] / pattern), val_fraction=0.01).sources[0]
    if key == "parquet":
        expected = corpus["parquet"][:60]
    elif key == "jsonl" and "012" in pattern:
        expected = corpus["jsonl"][:90]
    else:
        expected = corpus[key]
    expected = [d for d in expected if not is_held_out(d, 0.01)]
    seen = []
    for rank in range(2):
        stream = DocumentStream(spec, "train", rank, 2, seed=0, val_fraction=0.01, on_bad_row="skip")
        mine = []
        while stream.epoch == 0:
            mine.append(stream.next_document())
        seen.append(mine[:-1])  # the last one is from epoch 1
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(expected)


def test_files_are_read_in_a_new_seeded_order_every_epoch(corpus):
    """data.shuffle_files (the default): every epoch reads the 4 shards whole, in a new order seeded by (seed,
    epoch); 2 DP ranks split each epoch's shards disjointly and completely; a stream resumed in the middle of
    an epoch continues exactly."""
    from data_pipelines.sources import epoch_file_order

    spec = plan_of(files(corpus["dir"] / "a*.jsonl"), val_fraction=0.01).sources[0]
    expected = sorted(d for d in corpus["jsonl"] if not is_held_out(d, 0.01))

    def stream(rank, world, state=None):
        return DocumentStream(spec, "train", rank, world, seed=3, val_fraction=0.01, on_bad_row="skip",
                              shuffle_files=True, state=state)

    by_epoch: dict[int, list[str]] = {0: [], 1: [], 2: []}
    one = stream(0, 1)
    while one.epoch < 3:
        doc = one.next_document()
        if one.epoch < 3:
            by_epoch[one.epoch].append(doc)
    orders = []
    for epoch, docs in by_epoch.items():
        assert sorted(docs) == expected, f"epoch {epoch}: not every document exactly once"
        shard_of = [int(d.split()[0].split("-")[1]) // 30 for d in docs]  # the fixture: 30 documents per file
        runs = [s for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
        assert runs == epoch_file_order(4, 3, epoch), f"epoch {epoch}: files read as {runs}"
        orders.append(tuple(runs))
    assert len(set(orders)) > 1 and orders[0] != (0, 1, 2, 3)

    for epoch in range(2):  # 2 ranks: each epoch's (reordered) shards split without overlap or loss
        shares = []
        for rank in range(2):
            s = stream(rank, 2, state={"epoch": epoch})
            mine = []
            while s.epoch == epoch:
                mine.append(s.next_document())
            shares.append(mine[:-1])
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == expected

    ref = stream(0, 1)
    for _ in range(len(expected) + 40):  # into epoch 1
        ref.next_document()
    resumed = stream(0, 1, state=roundtrip(ref.state_dict()))
    assert [resumed.next_document() for _ in range(50)] == [ref.next_document() for _ in range(50)]


def test_states_from_before_file_shuffling_name_the_key(corpus):
    """A data state written before data.shuffle_files existed read its files in order: resuming it with
    shuffling on would not be exact, so it stops and names the key."""
    plan = plan_of(files(corpus["dir"] / "a*.jsonl"), num_workers=0)
    ref = StreamingData(plan, 48, 2, 1, 0, 1)
    read(ref, 2)
    state = roundtrip(ref.state_dict())
    ref.close()
    del state["fingerprint"]["shuffle_files"]
    resumed = StreamingData(plan, 48, 2, 1, 0, 1)
    with pytest.raises(DataError, match="data.shuffle_files"):
        resumed.load_state_dict(state)
    in_order = StreamingData(plan_of(files(corpus["dir"] / "a*.jsonl"), num_workers=0, shuffle_files=False),
                             48, 2, 1, 0, 1)
    in_order.load_state_dict(state)  # with the key set as the state was written, it resumes


def test_validation_is_held_out_and_fixed(corpus):
    plan = plan_of(files(corpus["dir"] / "a*.jsonl"), val_fraction=0.2, num_workers=0)
    data = StreamingData(plan, 16, 2, 0)
    val = data.val_batches(3)
    assert len(val) == 3 and val[0]["input_ids"].shape == (2, 16)
    assert same(val, StreamingData(plan, 16, 2, 0).val_batches(3))
    # held-out files instead of the hash split
    plan = plan_of(files(corpus["dir"] / "a[012].jsonl", val_path=str(corpus["dir"] / "a3.jsonl")), num_workers=0)
    tok = load_tokenizer(plan.tokenizer)
    val = StreamingData(plan, 16, 2, 0).val_batches(1)
    assert tok.decode(val[0]["input_ids"][0].tolist()).startswith("J-00090")


# ---------------------------------------------------------------- exact resume

MIXTURE = "mixture"


def make_plan(corpus, kind: str, workers: int):
    if kind == MIXTURE:
        return plan_of(files(corpus["dir"] / "a*.jsonl", name="j", weight=3.0),
                       files(corpus["dir"] / "p*.parquet", name="p", weight=1.0),
                       SourceConfig(kind="bundled", name="b", weight=0.5), num_workers=workers)
    return plan_of(files(corpus["dir"] / "a*.jsonl"), num_workers=workers)


@pytest.mark.parametrize("kind,workers,dp", [("jsonl", 0, (0, 1)), ("jsonl", 2, (0, 1)), (MIXTURE, 1, (1, 2)),
                                             (MIXTURE, 0, (0, 2))])
def test_resume_continues_exactly_twice(corpus, kind, workers, dp):
    """Read N, save, read M, read K. A pipeline restored from the state reads exactly those M; saved again and
    restored again, exactly those K. Epochs wrap during the read (the fixture is small)."""
    n, m, k = 5, 7, 6
    plan = make_plan(corpus, kind, workers)
    ref = StreamingData(plan, 48, 3, 11, *dp)
    head = read(ref, n)
    state1 = roundtrip(ref.state_dict())
    rest = read(ref, m + k)
    ref.close()
    first = StreamingData(plan, 48, 3, 11, *dp)
    first.load_state_dict(state1)
    assert same(read(first, m), rest[:m])
    state2 = roundtrip(first.state_dict())
    first.close()
    second = StreamingData(plan, 48, 3, 11, *dp)
    second.load_state_dict(state2)
    assert same(read(second, k), rest[m:])
    second.close()
    assert not same(head[:1], rest[:1])


def test_two_dp_ranks_resume_without_overlap_or_loss(corpus):
    """2 ranks, each saving and resuming: together they read each document of an epoch exactly once. (Files in a
    fixed order: the ranks' shares stay the same over the epochs this reads.)"""
    plan = plan_of(files(corpus["dir"] / "a*.jsonl"), num_workers=0, val_fraction=0.01, shuffle_buffer=0,
                   shuffle_files=False)
    tok = load_tokenizer(plan.tokenizer)
    texts = []
    for rank in range(2):
        a = StreamingData(plan, 64, 2, 5, rank, 2)
        part = read(a, 6)
        b = StreamingData(plan, 64, 2, 5, rank, 2)
        b.load_state_dict(roundtrip(a.state_dict()))
        a.close()
        part += read(b, 120)
        b.close()
        ids = [int(part[0]["input_ids"][0, 0])]
        for batch in part:
            for row in batch["labels"]:
                ids += row.tolist()
        texts.append(tok.decode(ids, skip_special_tokens=False).split("<|endoftext|>"))
    expected = {d for d in corpus["jsonl"] if not is_held_out(d, 0.01)}
    r0, r1 = (set(t[:-1]) & expected for t in texts)  # whole documents each rank read
    assert len(r0) > 20 and len(r1) > 20
    assert not r0 & r1
    assert r0 | r1 == expected


def test_state_files_and_a_fresh_process(corpus, tmp_path):
    """Per-rank files next to a checkpoint; a fresh Python process restored from them continues exactly."""
    plan = plan_of(files(corpus["dir"] / "p*.parquet"), num_workers=1)
    ref = StreamingData(plan, 40, 2, 3, 1, 2)
    read(ref, 4)
    path = save_data_state(ref, tmp_path / "ckpt" / "step0000004", rank=1)
    assert path.name == "data_state_rank1.json"
    rest = read(ref, 5)
    ref.close()
    script = (
        "import sys, torch, datasets; datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0\n"
        "from dsv4.run_config import DataConfig, SourceConfig\n"
        "from data_pipelines import StreamingData, load_data_state, prepare_data\n"
        f"src = SourceConfig(kind='files', path={str(corpus['dir'] / 'p*.parquet')!r})\n"
        "plan = prepare_data(DataConfig(sources=[src], num_workers=1))\n"
        "d = StreamingData(plan, 40, 2, 3, 1, 2)\n"
        f"load_data_state(d, {str(tmp_path / 'ckpt' / 'step0000004')!r}, 1)\n"
        "it = d.batches(); torch.save([next(it) for _ in range(5)], sys.argv[1]); d.close()\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.pt")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert same(torch.load(tmp_path / "out.pt"), rest)
    # a state from another rank, or after a change of settings, is refused, naming what changed
    other = StreamingData(plan, 40, 2, 3, 0, 2)
    with pytest.raises(DataError, match="data-parallel rank 1"):
        load_data_state(other, tmp_path / "ckpt" / "step0000004", 1)
    longer = StreamingData(plan, 64, 2, 3, 1, 2)
    with pytest.raises(DataError, match="train.seq_len changed"):
        load_data_state(longer, tmp_path / "ckpt" / "step0000004", 1)
    with pytest.raises(DataError, match="no data state"):
        load_data_state(longer, tmp_path / "ckpt" / "nowhere", 1)


# ---------------------------------------------------------------- mixtures

def test_mixture_proportions_match_weights_and_are_seeded(corpus):
    plan = plan_of(files(corpus["dir"] / "a*.jsonl", name="j", weight=6),
                   files(corpus["dir"] / "p*.parquet", name="p", weight=3),
                   files(corpus["dir"] / "txt/*.txt", name="t", weight=1), num_workers=0)
    lane = LanePipeline(plan, "train", 128, 1, 7, 0, 1)
    while sum(lane.mixture.docs) < 3000:
        lane.next_sequence()
    docs = lane.mixture.docs
    for got, want in zip(docs, (0.6, 0.3, 0.1)):
        assert abs(got / sum(docs) - want) < 0.025, docs
    data = StreamingData(plan, 128, 1, 7)
    read(data, 3)
    assert "j docs" in data.describe_stats() and "(weight 0.600)" in data.describe_stats()
    # seeded: the same seed draws the same documents, another seed others
    def first_sources(seed):
        lane = LanePipeline(plan, "train", 128, 1, seed, 0, 1)
        return [lane.mixture.choose() for _ in range(50)]
    assert first_sources(7) == first_sources(7) != first_sources(8)


def test_token_weighted_mixture_matches_token_shares_and_resumes(corpus):
    """data.mix_by=tokens: a source of documents ~10x longer gets the weighted share of TOKENS (by documents it
    would take most of them); the draws depend on the counts, which the state keeps, so resume stays exact."""
    d = corpus["dir"]
    long_docs = [" ".join([doc_text("L", i)] * 10) for i in range(60)]
    (d / "long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in long_docs))
    shares = {}
    for mix_by in ("tokens", "documents"):
        plan = plan_of(files(d / "a*.jsonl", name="short", weight=1), files(d / "long.jsonl", name="long", weight=1),
                       num_workers=0, mix_by=mix_by)
        lane = LanePipeline(plan, "train", 128, 1, 5, 0, 1)
        while sum(lane.mixture.tokens) < 300_000:
            lane.next_sequence()
        tokens, docs = lane.mixture.tokens, lane.mixture.docs
        shares[mix_by] = (tokens[1] / sum(tokens), docs[1] / sum(docs))  # the long source's token, document share
    assert abs(shares["tokens"][0] - 0.5) < 0.03, shares  # tokens split as weighted
    assert shares["tokens"][1] < 0.2, shares  # ... by drawing the long source far less often
    assert abs(shares["documents"][1] - 0.5) < 0.03 and shares["documents"][0] > 0.8, shares

    plan = plan_of(files(d / "a*.jsonl", weight=1), files(d / "long.jsonl", weight=1), num_workers=0, mix_by="tokens")
    ref = StreamingData(plan, 64, 2, 9)
    read(ref, 4)
    state = roundtrip(ref.state_dict())
    rest = read(ref, 6)
    ref.close()
    resumed = StreamingData(plan, 64, 2, 9)
    resumed.load_state_dict(state)
    assert same(read(resumed, 6), rest)
    resumed.close()


# ---------------------------------------------------------------- bad input

def test_missing_and_unreadable_files_name_the_key_and_file(corpus, tmp_path):
    d = corpus["dir"]
    with pytest.raises(DataError, match=r"data.sources\[1\].path: no file matches '.*nope/\*.jsonl'"):
        plan_of(files(d / "a0.jsonl"), files(d / "nope/*.jsonl"))
    (d / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"data.sources\[0\].path: cannot read .*bad.parquet"):
        plan_of(files(d / "bad.parquet"))
    (d / "bad.jsonl.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match=r"cannot read .*bad.jsonl.gz"):
        plan_of(files(d / "bad.jsonl.gz"))
    (d / "array.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(DataError, match="JSON array"):
        plan_of(files(d / "array.json"))
    with pytest.raises(DataError, match=r"data.sources\[0\].text_field='body': no such column .*p0.parquet"):
        plan_of(files(d / "p0.parquet", text_field="body"))
    with pytest.raises(DataError, match="data.tokenizer: tokenizer file not found"):
        plan_of(files(d / "a0.jsonl"), tokenizer=str(d / "tok.json"))
    with pytest.raises(DataError, match="data.tokenizer='nobody/no-tokenizer'.*Hub"):
        plan_of(files(d / "a0.jsonl"), tokenizer="nobody/no-tokenizer")
    with pytest.raises(DataError, match=r"data.sources\[0\] \(x\): cannot open hub dataset 'nobody/nothing'.*network"):
        plan_of(SourceConfig(kind="hub", name="x", hub="nobody/nothing"))


def bad_rows_file(path: Path) -> None:
    rows = [json.dumps({"text": doc_text("G", i)}) for i in range(40)]
    rows[3] = '{"text": "broken'  # malformed JSON
    rows[7] = json.dumps({"body": "no text field"})
    rows[9] = json.dumps({"text": None})
    rows[11] = json.dumps({"text": "   "})  # empty document
    rows[13] = "[1, 2]"  # not an object
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_rows_are_skipped_and_counted_or_raise(tmp_path, workers):
    bad_rows_file(tmp_path / "g.jsonl")
    plan = plan_of(files(tmp_path / "g.jsonl"), num_workers=workers, val_fraction=0.01, shuffle_buffer=0)
    data = StreamingData(plan, 64, 2, 0)
    read(data, 12)
    assert data.stats()["skipped"]["g0"] == {"malformed": 2, "missing_field": 2, "empty": 1}
    assert "2 malformed, 2 missing_field, 1 empty" in data.describe_stats()
    data.close()
    strict = StreamingData(plan_of(files(tmp_path / "g.jsonl"), num_workers=workers, on_bad_row="raise",
                                   shuffle_buffer=0), 64, 2, 0)
    with pytest.raises(DataError) as err:
        read(strict, 12)
    msg = str(err.value)
    assert msg.startswith("rank 0, data") and "data.sources[0] (g0): malformed JSON line" in msg
    assert "data.on_bad_row=skip" in msg and "Traceback" not in msg
    strict.close()


def test_a_source_with_no_usable_document_stops_naming_it(tmp_path):
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"other": "x"}) + "\n")
    data = StreamingData(plan_of(files(tmp_path / "e.jsonl"), num_workers=1), 16, 1, 0)
    with pytest.raises(DataError, match=r"rank 0, data worker 0: data.sources\[0\] \(e0\).*no usable document"):
        read(data, 1)
    data.close()


def test_a_process_with_open_or_failed_worker_streams_exits(corpus, tmp_path):
    """The workers ignore SIGTERM (a launcher's signal to the process tree must not kill them mid-step), so a stream
    left open, or ended by a worker's error while a traceback still holds it, must not keep its process from
    exiting: multiprocessing's exit hook would wait for them forever."""
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    script = (
        "import sys\n"
        "from dsv4.run_config import DataConfig, SourceConfig\n"
        "from data_pipelines import StreamingData, prepare_data\n"
        "def stream(path):\n"
        "    return StreamingData(prepare_data(DataConfig(sources=[SourceConfig(kind='files', path=path)],\n"
        "                                                 num_workers=1)), 16, 1, 0)\n"
        "kept = stream(sys.argv[1]); next(kept.batches())  # open, never closed\n"
        "try:\n"
        "    next(stream(sys.argv[2]).batches())\n"
        "except Exception as e:\n"
        "    failed = sys.exc_info()  # the traceback holds the failed stream's frame\n"
        "    print(type(e).__name__)\n")
    res = subprocess.run([sys.executable, "-c", script, str(corpus["dir"] / "p*.parquet"), str(tmp_path / "e.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "DataError", res.stdout + res.stderr[-2000:]


# ---------------------------------------------------------------- config keys and the inspect CLI

def compose_data(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return resolve_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("overrides,key", [
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.on_bad_row=ignore"], "data.on_bad_row"),
    (["data=mixture_example", "data.mix_by=lines"], "data.mix_by"),
    (["data=jsonl_example", "data.sources.0.kind=s3"], "data.sources[0].kind"),
    (["data=mixture_example", "data.sources.1.weight=0"], "data.sources[1].weight"),
    (["data=hub_example", "data.sources.0.hub=null"], "data.sources[0].hub"),
    (["data=jsonl_example", "data.path=x.txt"], "data.path"),
    (["data=mixture_example", "data.sources.1.name=books"], "data.sources[1].name"),
])
def test_bad_data_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose_data(*overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_example_configs_compose():
    assert compose_data().data.sources == [] and compose_data().data.cross_document_attention is True
    assert [s.weight for s in compose_data("data=mixture_example").data.sources] == [0.7, 0.3]
    assert compose_data("data=hub_example").data.sources[0].kind == "hub"


def test_inspect_prints_samples_counts_and_proportions(corpus):
    d = corpus["dir"]
    res = subprocess.run(
        [sys.executable, "-m", "data_pipelines.inspect", "mixture_example", "--samples", "2", "--batches", "5",
         f"data.sources.1.path={d / 'p*.parquet'}", "train.seq_len=64", "train.micro_batch_size=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "mixture of books" in out and "---- sample 2" in out and "read 10 sequences (640 tokens)" in out
    assert "books docs" in out and "(weight 0.700)" in out and "validation:" in out
    res = subprocess.run([sys.executable, "-m", "data_pipelines.inspect", "jsonl_example",
                          f"data.sources.0.path={d / 'none*.jsonl'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "data.sources[0].path: no file matches" in res.stderr
    assert "Traceback" not in res.stderr

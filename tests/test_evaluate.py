"""`python -m dsv4.evaluate` on a real tiny run (train.py on the bundled corpus + passkey mixture): the validation
loss equals the trainer's own evaluation of the same checkpoint and the run directory is left unchanged; position
buckets add up to the overall loss; greedy decoding; bad arguments name the flag; the lm-evaluation-harness backend
on a local task."""

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_training import env, run

from dsv4.evaluate import main as evaluate_main
from dsv4.evaluation.data import RunSettings, run_settings, validation_batches
from dsv4.evaluation.decoding import greedy_continue
from dsv4.evaluation.losses import bucket_edges, evaluate_batches
from dsv4.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
MIXTURE = ("data.sources=[{kind: bundled, name: books, weight: 0.8}, {kind: passkey, name: keys, weight: 0.2, "
           "passkey: {min_tokens: 40, max_tokens: 120, val_documents: 4}}]")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    res = run([sys.executable, "train.py", "train.seq_len=128", "train.micro_batch_size=2", "train.steps=4",
               "train.phases.dense_steps=1", "train.phases.indexer_warmup_steps=1", "train.warmup_steps=1",
               "train.eval_batches=3", "data.num_workers=0", MIXTURE, f"train.output_dir={out}"], threads=1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def test_evaluate_gives_the_trainers_validation_loss_and_leaves_the_run_unchanged(tiny_run, tmp_path):
    before = tree_digest(tiny_run)
    out = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, "-m", "dsv4.evaluate", str(tiny_run), "--tasks", "ppl,positions,passkey",
                          "--passkey-lengths", "64,128", "--passkey-depths", "0,1", "--passkey-per-cell", "1",
                          "--out", str(out), "--wandb", "--wandb-dir", str(tmp_path / "wb")],
                         cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    trainer = json.loads((tiny_run / "summary.json").read_text())["val_loss"]
    assert results["ppl"]["loss"] == pytest.approx(trainer, rel=1e-6, abs=1e-6)
    assert results["ppl"]["tokens"] == 3 * 2 * 128 and results["phase"] == "sparse"
    assert results["passkey"]["lengths"] == [64, 128] and results["passkey"]["n"] == 4
    assert f"ppl: loss {results['ppl']['loss']:.4f}" in res.stdout and "| 64..128 |" in res.stdout
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))  # logged, outside the run directory
    assert tree_digest(tiny_run) == before


def test_position_buckets_weighted_by_their_tokens_equal_the_overall_loss(tiny_run):
    assert bucket_edges(32, 512) == [0, 32, 64, 128, 256, 512]
    assert bucket_edges(64, 100) == [0, 64, 100] and bucket_edges(64, 64) == [0, 64]
    loaded = load_model(tiny_run)
    settings = run_settings(loaded)
    batches, what = validation_batches(loaded, settings, "bundled", 2, 256, 2)
    assert "held-out" in what
    result = evaluate_batches(loaded.model, batches, loaded.config.sliding_window, 256)
    buckets = result["positions"]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 64), (64, 128), (128, 256)]
    assert all(b["tokens"] > 0 for b in buckets) and sum(b["tokens"] for b in buckets) == result["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / result["tokens"]
    assert weighted == pytest.approx(result["loss"], rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert 0.0 <= result["indexer_recall"] <= 1.0 and 0.0 < result["sink_mass"] < 1.0
    # an export has no run: its defaults, and --data is needed for a loss
    assert run_settings(type(loaded)(loaded.model, loaded.config, loaded.tokenizer, loaded.eos_id, loaded.source)) \
        == RunSettings()


def test_recall_task_runs_on_a_run_that_never_saw_recall(tiny_run, tmp_path, capsys):
    """A text run (bundled BPE tokenizer, no recall source): recall symbols take reserved ids, MQAR answers 1-8 windows
    back, every answer in one bucket, the CSA layers' hit rates read (the run ended in the sparse phase)."""
    out = tmp_path / "recall.json"
    assert evaluate_main([str(tiny_run), "--tasks", "recall", "--recall-docs", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["recall"]["tasks"]["mqar"]
    assert result["answers"] == 6 * 8 and sum(b["answers"] for b in result["buckets"]) == 6 * 8
    assert result["spec"]["gap"] == 64 and result["spec"]["gap_max"] == 8 * 64  # the tiny model's W = 64
    assert set(result["indexer_hit_rate"]) == {"1", "3"}  # the CSA layers of [0, 4, 32, 4]
    assert "recall mqar (mqar, 8 items, gap 64-512" in capsys.readouterr().out


def test_greedy_continue_decodes_greedily_in_groups_and_stops_at_eos(tiny_run):
    model = load_model(tiny_run).model
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25]]
    got = greedy_continue(model, prompts, 4, batch_size=1)
    for prompt, continuation in zip(prompts, got):
        ids = list(prompt)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert continuation == ids[len(prompt):]
    assert greedy_continue(model, prompts, 4) == got  # batched the same
    first = got[0][0]
    assert greedy_continue(model, prompts[:1], 4, eos_id=first) == [[first]]


@pytest.mark.parametrize("argv,message", [
    (["{missing}"], "path: no such file or directory"),
    (["{run}", "--tasks", "ppl,bleu"], "--tasks='ppl,bleu': choose from ppl, positions, passkey"),
    (["{run}", "--passkey-depths", "0.5,2"], "--passkey-depths='0.5,2': depths are in [0, 1]"),
    (["{run}", "--passkey-lengths", "64,x"], "--passkey-lengths='64,x': give comma-separated integers"),
    (["{run}", "--batches", "0"], "--batches=0: must be >= 1"),
    (["{run}", "--tasks", "ppl", "--data", "{missing}/*.jsonl"], "--data: data.sources[0].path: no file matches"),
    (["{run}", "--tasks", "passkey", "--passkey-lengths", "8"], "passkey length 8: too short"),
])
def test_bad_arguments_name_the_argument(tiny_run, tmp_path, capsys, argv, message):
    argv = [a.format(run=tiny_run, missing=tmp_path / "nothing") for a in argv]
    assert evaluate_main(argv) == 2
    assert message in capsys.readouterr().err


TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{extra}
"""


def test_lm_eval_backend_scores_a_local_task_offline(tiny_run, tmp_path):
    """`lm_eval` with `--model dsv4` on two local tasks (a task YAML over a jsonl written here): the harness's
    loglikelihoods equal the model's own, its accuracy follows them, and its generations are greedy decoding."""
    pytest.importorskip("lm_eval")
    rows = [{"question": "It was the best of times, it was the", "choices": [" worst", " best", " end"], "gold": 0},
            {"question": "Call me", "choices": [" Ishmael", " later", " now"], "gold": 0},
            {"question": "The pass key is 12345. What is the pass key? The pass key is", "choices": [" 12345",
                                                                                                  " 54321"], "gold": 0}]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_choice.yaml").write_text(TASK_YAML.format(
        name="toy_choice", data=data, output_type="multiple_choice",
        extra='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\ntarget_delimiter: ""\n'
              'metric_list:\n  - metric: acc'))
    (tasks / "toy_generate.yaml").write_text(TASK_YAML.format(
        name="toy_generate", data=data, output_type="generate_until",
        extra=textwrap.dedent('''\
            doc_to_target: "{{choices[gold]}}"
            generation_kwargs:
              until: ["\\n", "."]
              max_gen_toks: 5
              do_sample: false
            metric_list:
              - metric: exact_match''')))
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "dsv4.evaluation.harness", "--model", "dsv4", "--model_args",
                          f"path={tiny_run}", "--tasks", "toy_choice,toy_generate", "--include_path", str(tasks),
                          "--output_path", str(out), "--log_samples"],
                         cwd=ROOT, env=dict(env(1), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    samples = {p.name.split("_toy_")[1].split("_")[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in out.rglob("samples_*.jsonl")}
    loaded = load_model(tiny_run)
    tok, model = loaded.tokenizer, loaded.model
    correct = 0
    for sample in sorted(samples["choice"], key=lambda s: s["doc_id"]):
        row = rows[sample["doc_id"]]
        context = tok.encode(row["question"], add_special_tokens=False).ids
        mine = []
        for choice in row["choices"]:
            cont = tok.encode(row["question"] + choice, add_special_tokens=False).ids[len(context):]
            with torch.no_grad():
                logits = model(torch.tensor([context + cont[:-1]]))[0, -len(cont):]
            mine.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()))
        harness = [float(r[0][0]) for r in sample["resps"]]
        assert harness == pytest.approx(mine, abs=1e-4)
        correct += int(max(range(len(mine)), key=mine.__getitem__) == row["gold"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["toy_choice"]["acc,none"] == pytest.approx(correct / len(rows))
    for sample in samples["generate"]:
        ids = tok.encode(rows[sample["doc_id"]]["question"], add_special_tokens=False).ids
        text = tok.decode(greedy_continue(model, [ids], 5, eos_id=loaded.eos_id)[0])
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text.replace(tok.id_to_token(loaded.eos_id), "")

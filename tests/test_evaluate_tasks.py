"""The task registry drives `python -m dsv4.evaluate`: every registered task is a --tasks choice with its entry and
flags in --help, an unknown name lists the choices, ppl and positions share one validation pass, and a task added
to the registry gets its flags checked, its run, its table, its JSON entry and its W&B scalars without any change
to dsv4/evaluate.py. No model is trained or loaded."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

import dsv4.evaluate as ev
from dsv4.config import ConfigError
from dsv4.evaluation.data import RunSettings
from dsv4.evaluation.tasks import DEFAULT_TASKS, TASKS, EvalContext, Task, positions, ppl, validation
from dsv4.evaluation.tasks.base import flag


def test_every_registered_task_is_a_choice_with_its_help_and_flags(capsys, tmp_path):
    assert list(TASKS) == ["ppl", "positions", "passkey", "recall"] and DEFAULT_TASKS == ("ppl", "positions", "passkey")
    help_text = ev.build_parser().format_help()
    for name, task in TASKS.items():
        assert f"\n  {name:<11}{task.summary.splitlines()[0]}\n" in help_text
        assert all(f.name in help_text for f in task.flags)
        # accepted by --tasks: what fails is the missing model, after every check
        assert ev.main([str(tmp_path / "nope"), "--tasks", name, "--device", "cpu"]) == 2
        assert "error: path: no such file or directory" in capsys.readouterr().err
    assert ev.build_parser().parse_args(["x"]).tasks == "ppl,positions,passkey"


def test_an_unknown_task_names_every_registered_choice(capsys, tmp_path):
    assert ev.main([str(tmp_path / "nope"), "--tasks", "ppl,bleu"]) == 2
    assert f"--tasks='ppl,bleu': choose from {', '.join(TASKS)} (comma-separated)" in capsys.readouterr().err
    with pytest.raises(TypeError, match="passkey_lenghts"):  # a misspelt option fails before any loading
        ev.evaluate(tmp_path / "nope", ["passkey"], passkey_lenghts=[64])


def test_ppl_and_positions_read_one_validation_pass(monkeypatch):
    calls = []

    def one_pass(*args):
        calls.append(args)
        return {"data": "d", "seq_len": 8, "loss": 1.0, "ppl": 2.7, "tokens": 8, "batches": 1,
                "positions": {"window": 4, "buckets": [], "loss_within_window": 1.0, "loss_beyond_window": 1.0}}

    monkeypatch.setattr(validation, "loss_tasks", one_pass)
    context = EvalContext(SimpleNamespace(), RunSettings(), 0, dict(validation.DEFAULTS, batches=3))
    assert ppl.TASK.run(context) == {"data": "d", "seq_len": 8, "loss": 1.0, "ppl": 2.7, "tokens": 8, "batches": 1}
    assert positions.TASK.run(context)["data"] == "d"
    assert len(calls) == 1 and calls[0][3] == 3  # --batches reached the one pass


def test_a_registered_task_drives_the_command(monkeypatch, tmp_path, capsys):
    def check(args: argparse.Namespace) -> dict:
        if args.toy_n < 1:
            raise ConfigError(f"--toy-n={args.toy_n}: must be >= 1")
        return {"toy_n": args.toy_n}

    toy = Task(name="toy", summary="counts to --toy-n\nsecond line", default=False,
               run=lambda ctx: {"n": ctx.options["toy_n"], "seed": ctx.seed},
               format=lambda r: [f"toy: n {r['n']}"], metrics=lambda r: {"eval/toy/n": r["n"]},
               flags=(flag("--toy-n", type=int, default=2, help="toy: how far"),), check=check, defaults={"toy_n": 2})
    monkeypatch.setitem(TASKS, "toy", toy)
    config = SimpleNamespace(num_hidden_layers=1, sliding_window=4, layer_kind=lambda i: "window")
    loaded = SimpleNamespace(model=SimpleNamespace(set_attention_options=lambda phase: None,
                                                   parameters=lambda: [torch.zeros(3)]),
                             config=config, run_config=None, source=SimpleNamespace(path=tmp_path, kind="export"))
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: loaded)
    assert "--toy-n TOY_N" in ev.build_parser().format_help()
    assert "\n  toy        counts to --toy-n\n             second line" in ev.task_list()

    assert ev.main([str(tmp_path), "--tasks", "toy", "--toy-n", "0", "--device", "cpu"]) == 2
    assert "error: --toy-n=0: must be >= 1" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert ev.main([str(tmp_path), "--tasks", "toy", "--toy-n", "5", "--seed", "7", "--device", "cpu",
                    "--out", str(out)]) == 0
    assert "toy: n 5" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["toy"] == {"n": 5, "seed": 7} and "ppl" not in results
    assert ev.flat_metrics(results) == {"eval/toy/n": 5}
    assert ev.evaluate(tmp_path, ["toy"])["toy"]["n"] == 2  # the Python API takes the task's default

"""Issue 19: small trust fixes, each checked in-process without training or model loading: quality.py's output
directory, inspect's --samples and overrides, evaluate's progress lines and its --batches shortfall, the harness'
checks before lm-eval reads its task index and its --help."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402


def test_quality_refuses_an_output_directory_it_cannot_create(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(quality, "count_params", lambda *a: pytest.fail("work started before the check"))
    assert quality.main([str(blocker / "out"), "--toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker / "out") in err[0] and "cannot create or write" in err[0]
    assert quality.check_out_dir(tmp_path / "new" / "dir") is None and not list((tmp_path / "new" / "dir").iterdir())


def test_inspect_refuses_bad_samples_and_overrides_it_does_not_read(capsys):
    from data_pipelines.inspect import main

    with pytest.raises(SystemExit) as e:
        main(["--samples", "-1"])
    assert e.value.code == 2 and "--samples=-1" in capsys.readouterr().err
    for override in ("train.lr=1", "model.hidden_size=3", "+optim.foo=1"):
        assert main([override]) == 2
        err = capsys.readouterr().err
        assert override in err and "only reads the data settings" in err
    from data_pipelines.inspect import _read_by_inspect

    assert all(_read_by_inspect(k) for k in ("data", "data.tokenizer", "train.seq_len", "train.micro_batch_size"))


def test_evaluate_prints_progress_and_says_why_fewer_batches(capsys, monkeypatch):
    from dsv4.evaluation.data import RunSettings
    from dsv4.evaluation.tasks import validation

    monkeypatch.setattr(validation, "validation_batches", lambda *a: ([{}] * 8, "bundled (held-out split)"))
    monkeypatch.setattr(validation, "evaluate_batches", lambda *a: {"loss": 1.0})
    loaded = SimpleNamespace(model=None, config=SimpleNamespace(sliding_window=64))
    settings = RunSettings(seq_len=512, micro_batch=8, eval_batches=4)
    assert validation.loss_tasks(loaded, settings, None, 16, None, None)["loss"] == 1.0
    out = capsys.readouterr()
    assert out.out == ""  # stdout (the tables) unchanged
    assert "ppl/positions: 16 batches of 8 x 512 tokens" in out.err
    assert "--batches 16: asked for 16 batches" in out.err and "holds only 8" in out.err
    validation.loss_tasks(loaded, settings, None, 8, None, None)
    assert "holds only" not in capsys.readouterr().err  # all there: no such line


def _harness(monkeypatch, capsys, argv, raises=None):
    harness = pytest.importorskip("dsv4.evaluation.harness")
    import lm_eval.__main__

    called = []

    def fake_cli():
        called.append(True)
        if raises is not None:
            raise raises

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    monkeypatch.setattr(sys, "argv", ["harness", *argv])
    with pytest.raises(SystemExit) as e:
        harness.main()
    return e.value.code, capsys.readouterr(), called


def test_harness_checks_tasks_and_model_args_before_lm_eval(monkeypatch, capsys, tmp_path):
    code, out, called = _harness(monkeypatch, capsys, ["--model", "dsv4", "--model_args", f"path={tmp_path}"])
    assert code == 2 and not called and "--tasks" in out.err and len(out.err.strip().splitlines()) == 1
    code, out, called = _harness(monkeypatch, capsys, ["--model", "dsv4", "--model_args",
                                                       f"path={tmp_path},dtype=float8", "--tasks", "x"])
    assert code == 2 and not called and "dtype=float8" in out.err
    code, out, called = _harness(monkeypatch, capsys, ["--model", "dsv4", "--model_args", "path=/no/such/run",
                                                       "--tasks", "x"])
    assert code == 2 and not called and "path=/no/such/run" in out.err
    # lm-eval's CLI passes its --device (default cuda:0) to every model: device= as well was a TypeError traceback
    code, out, called = _harness(monkeypatch, capsys, ["--model", "dsv4", "--model_args",
                                                       f"path={tmp_path},device=cpu", "--tasks", "x"])
    assert code == 2 and not called and "--device cpu" in out.err and len(out.err.strip().splitlines()) == 1


def test_harness_refuses_a_task_no_task_file_names_before_lm_eval_indexes_its_tasks(monkeypatch, capsys, tmp_path):
    argv = ["--model", "dsv4", "--model_args", f"path={tmp_path}", "--tasks", "hellaswag,nope_no_such_task"]
    code, out, called = _harness(monkeypatch, capsys, argv)
    assert code == 2 and not called and "Tasks not found: nope_no_such_task" in out.err
    assert "hellaswag" not in out.err and len(out.err.strip().splitlines()) == 1
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: nope_no_such_task\n")
    code, out, called = _harness(monkeypatch, capsys, [*argv, "--include_path", str(tmp_path / "tasks")],
                                 SystemExit(0))
    assert code == 0 and called  # a task of the user's own: lm-eval's to run


def test_harness_maps_an_unknown_task_and_the_offline_hub_to_one_line(monkeypatch, capsys, tmp_path):
    argv = ["--model", "dsv4", "--model_args", f"path={tmp_path}", "--tasks", "hellaswag"]
    code, out, called = _harness(monkeypatch, capsys, argv, ValueError("Tasks not found: hellaswag"))
    assert code == 2 and called and "Tasks not found: hellaswag" in out.err and len(out.err.strip().splitlines()) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, called = _harness(monkeypatch, capsys, argv, ConnectionError("Couldn't reach 'x' on the Hub"))
    assert code == 2 and "HF_HUB_OFFLINE=0" in out.err and "--include_path" in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_harness_help_names_the_dsv4_model_and_its_args(monkeypatch, capsys):
    code, out, _ = _harness(monkeypatch, capsys, ["--help"], SystemExit(0))
    assert code == 0 and "--model dsv4" in out.out
    assert all(arg in out.out for arg in ("path", "max_length", "device", "dtype", "backend", "phase"))

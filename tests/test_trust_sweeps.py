"""Sweep and harness mistakes (issue 19): a bad override, sweep directory, job config or model_arg is refused in one
line naming it, exit code 2, before any work and with nothing written. Everything runs in-process (the sweep
driver's main(argv), the harness's model class); no job is launched."""

import os

import pytest

from dsv4.training import sweep

UNWRITABLE = "/proc/dsv4-trust-sweeps/x"  # nobody, root included, can create it (os.access would say yes)


def refused(capsys, argv, prog="train.py -m") -> str:
    """sweep.main(argv) must exit 2 with one error line and no traceback; -> that line."""
    with pytest.raises(SystemExit) as info:
        sweep.main([str(a) for a in argv], prog=prog)
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if f"{prog}: error: " in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "sweep " not in captured.out, captured.out  # nothing was started
    return lines[0].split(": error: ", 1)[1]


@pytest.mark.parametrize("override", ["train.lr=1e-3,,3e-3", "train.lr=[1e-3"])
def test_sweep_names_an_override_hydra_cannot_parse(tmp_path, capsys, override):
    line = refused(capsys, [override, "train.steps=2", "--sweep-dir", tmp_path / "s"])
    assert line.startswith(f"{override}: not a valid Hydra override"), line
    assert not (tmp_path / "s").exists()


def test_sweep_refuses_a_sweep_dir_it_cannot_write_before_any_job(capsys):
    line = refused(capsys, ["train.lr=1e-3,3e-3", "--sweep-dir", UNWRITABLE])
    assert line.startswith(f"--sweep-dir {UNWRITABLE}: cannot write there"), line


def test_sweep_checks_the_sweep_dir_by_writing_a_file(tmp_path):
    sweep.check_sweep_dir(tmp_path / "new")
    assert (tmp_path / "new" / "jobs").is_dir() and not list((tmp_path / "new" / "jobs").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(sweep.SweepError, match="--sweep-dir .*file: cannot write there"):
        sweep.check_sweep_dir(tmp_path / "file")


def test_dry_run_writes_nothing(tmp_path, capsys):
    code = sweep.main(["train.lr=1e-3,3e-3", "--dry-run", "--sweep-dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0 and "[2/2] train.lr=0.003" in out and "train.py train.lr=0.003" in out, out
    assert not (tmp_path / "s").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overrides, job, key", [
    (["train.bogus=1,2"], "job 0 (train.bogus=1)", "train.bogus"),
    (["train.lr=1e-3,-1"], "job 1 (train.lr=-1)", "train.lr=-1.0: must be > 0"),
    (["model=tiny,nope"], "job 1 (model=nope)", "model/nope"),
])
def test_sweep_validates_every_job_config_before_running_any(tmp_path, capsys, overrides, job, key):
    for extra in (["--dry-run"], []):  # a dry run lists no invalid job; a real sweep launches none
        line = refused(capsys, [*overrides, "--sweep-dir", tmp_path / "s", *extra])
        assert line.startswith(f"{job}: ") and key in line, line
        assert not (tmp_path / "s").exists()


def test_sweep_usage_names_how_it_was_invoked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--parallel", "0"], prog="train.py -m")
    err = capsys.readouterr().err
    assert err.startswith("usage: train.py -m ") and "launch/sweep.py" not in err, err
    with pytest.raises(SystemExit):
        sweep.main(["--parallel", "0"])
    assert capsys.readouterr().err.startswith("usage: launch/sweep.py ")


def test_train_py_passes_its_own_name_to_the_sweep_driver(monkeypatch):
    import train

    seen = {}

    def fake_main(argv, prog="launch/sweep.py"):
        seen.update(argv=argv, prog=prog)
        return 0

    monkeypatch.setattr(sweep, "main", fake_main)
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "train.lr=1e-3,3e-3", "--dry-run"])
    with pytest.raises(SystemExit) as info:
        train.main()
    assert info.value.code == 0 and seen == {"argv": ["train.lr=1e-3,3e-3", "--dry-run"], "prog": "train.py -m"}


def test_a_missing_sweep_config_exits_2(capsys):
    line = refused(capsys, ["sweep=nosuch", "--dry-run"])
    assert line.startswith("sweep=nosuch: no such sweep config"), line


# ---------------------------------------------------------------- the lm-evaluation-harness backend

@pytest.mark.parametrize("model_args, arg", [
    ("path=NOPE,bogus=1", "bogus=1: unknown model_arg"),
    ("path=NOPE,max_length=-1", "max_length=-1: must be"),
    ("path=NOPE,max_length=0", "max_length=0: must be"),
    ("path=NOPE,max_length=abc", "max_length=abc: must be"),
    ("path=NOPE,phase=nope", "phase=nope: choose from"),
    ("path=NOPE,backend=nope", "backend=nope: choose from"),
    ("path=NOPE,dtype=fp16", "dtype=fp16: choose from"),
    ("path=NOPE,device=tpu", "device=tpu: choose"),
])
def test_harness_refuses_unknown_and_bad_model_args_before_loading(tmp_path, model_args, arg):
    harness = pytest.importorskip("dsv4.evaluation.harness")
    from dsv4.config import ConfigError

    # what lm-eval does with --model_args (and the batch size / device it adds to every model)
    with pytest.raises(ConfigError, match=f"^--model_args {arg}"):
        harness.DSV4LM.create_from_arg_string(model_args.replace("NOPE", str(tmp_path / "nope")),
                                              {"batch_size": 1, "max_batch_size": None,
                                               "device": None if "device=" in model_args else "cpu"})


@pytest.mark.slow  # lm-eval's CLI indexes its task table first (~8 s)
def test_harness_cli_refuses_an_unknown_model_arg_with_exit_2(tmp_path, capsys, monkeypatch):
    harness = pytest.importorskip("dsv4.evaluation.harness")
    monkeypatch.setattr("sys.argv", ["harness", "--model", "dsv4", "--model_args",
                                     f"path={tmp_path / 'nope'},bogus=1", "--tasks", "hellaswag",
                                     "--output_path", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        harness.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error: --model_args bogus=1: unknown model_arg" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

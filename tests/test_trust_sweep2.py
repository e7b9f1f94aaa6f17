"""Issue 19, round 2 sweep: the entry points the first lists left out (compile_check, inspect, build_bundled, the
benchmarks, evaluate's W&B and task flags). A bad flag is refused in one line naming it, exit code 2, before any
work; a legal value that is almost certainly a mistake warns. Every case runs main(argv) in-process on a
nonexistent or tiny input: the checks come before anything is read, built or trained."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from dsv4.export import check_out_file

ROOT = Path(__file__).resolve().parent.parent
UNWRITABLE = "/proc/dsv4-trust-sweep2/x"  # nobody, root included, can create it


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_sweep2_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def refused(capsys, main, argv) -> str:
    """main(argv) must end with code 2 (returned or SystemExit) and one error line, argparse's (`prog: error: ...`)
    or ours (`error: ...`), no traceback and nothing on stdout; -> the text after `error: `."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if re.match(r"^([^:]+: )?error: ", line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out, out  # nothing was computed
    return lines[0].split("error: ", 1)[1]


# ---------------------------------------------------------------- Triton: compile_check and attention_core

@pytest.mark.parametrize("argv, says", [
    (["--tune", "foo"], "--tune: launch override 'foo': expected"),
    (["--tune", "fwd:BLOCK_H=abc"], "--tune: launch override 'fwd:BLOCK_H=abc': BLOCK_H=abc is not an integer"),
    (["--tune", "fwd:BLOCK_H"], "--tune: launch override 'fwd:BLOCK_H': 'BLOCK_H' is not KEY=VALUE"),
    (["--tune", "fwd:BLOCK_H=64,"], "--tune: launch override 'fwd:BLOCK_H=64,': '' is not KEY=VALUE"),
    (["--tune", "fwd:FOO=3"], "--tune: launch override 'fwd:FOO=3': unknown key 'FOO'"),
    (["--tune", "fwd:BLOCK_D=16"], "--tune: launch override 'fwd:BLOCK_D=16': unknown key 'BLOCK_D'"),
    (["--tune", "dq:BLOCK_H=0"], "--tune: launch override 'dq:BLOCK_H=0': BLOCK_H=0 is not an integer >= 1"),
    (["--tune", "dk:BLOCK_N=24"], "--tune: launch override 'dk:BLOCK_N=24': BLOCK_N=24 is not a power of 2"),
    (["--arch", "0"], "argument --arch: invalid choice: 0"),
    (["--arch", "130"], "argument --arch: invalid choice: 130"),
])
def test_compile_check_refuses_bad_flags_before_compiling(capsys, monkeypatch, argv, says):
    compile_check = pytest.importorskip("dsv4.tools.compile_check")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(compile_check, "build_all", lambda *a: pytest.fail("work started before the check"))
    monkeypatch.setattr(compile_check.attention_kernels, "LAUNCH_OVERRIDES", {})
    assert refused(capsys, compile_check.main, argv).startswith(says)


def test_compile_check_names_triton_interpret_in_one_line(capsys, monkeypatch):
    compile_check = pytest.importorskip("dsv4.tools.compile_check")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert refused(capsys, compile_check.main, ["--sizes", "tiny"]).startswith("TRITON_INTERPRET=1: ")


def test_launch_overrides_still_parse():
    from dsv4.ops.v4_attention.triton import parse_launch_overrides

    assert parse_launch_overrides(["fwd:BLOCK_H=64,num_warps=8", "dk:BLOCK_N=16"]) == {
        "fwd": {"BLOCK_H": 64, "num_warps": 8}, "dk": {"BLOCK_N": 16}}


@pytest.mark.parametrize("argv, says", [
    (["--tune", "fwd:BLOCK_H"], "--tune: launch override 'fwd:BLOCK_H': 'BLOCK_H' is not KEY=VALUE"),
    (["--hca-ratio", "0"], "--hca-ratio=0: must be > 4"),  # was silently the preset's ratio
    (["--hca-ratio", "2"], "--hca-ratio=2: must be > 4"),
    (["--repeats", "0"], "--repeats=0: must be >= 1"),
    (["--lengths", "64", "0"], "--lengths=0: must be >= 1"),
    (["--peak-tflops", "-1"], "--peak-tflops=-1.0: must be a number > 0"),
    (["--peak-tbs", "nan"], "--peak-tbs=nan: must be a number > 0"),
])
def test_attention_core_benchmark_refuses_bad_flags_before_timing(capsys, monkeypatch, argv, says):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    core = script("attention_core")
    monkeypatch.setattr(core.kernels, "LAUNCH_OVERRIDES", {})
    assert refused(capsys, core.main, ["--preset", "tiny", *argv]).startswith(says)


# ---------------------------------------------------------------- the attention layer benchmark

@pytest.mark.parametrize("argv, says", [
    (["--kinds", "foo"], "argument --kinds: invalid choice: 'foo'"),
    (["--repeats", "0"], "--repeats=0: must be >= 1"),
    (["--lengths", "0"], "--lengths=0: must be >= 1"),
    (["--lengths", "-5"], "--lengths=-5: must be >= 1"),
    (["--chunk", "0"], "--chunk=0: must be >= 1"),
    (["--profile", "-1"], "--profile=-1: must be >= 0"),
    (["--kinds", "hca", "--hca-ratio", "0"], "--hca-ratio=0: must be > 4"),  # was a window layer labelled hca
    (["--kinds", "hca", "--hca-ratio", "4"], "--hca-ratio=4: must be > 4"),  # was a CSA layer labelled hca
    pytest.param(["--paths", "triton", "--kinds", "csa"], "--paths triton: the Triton kernels need CUDA",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs no CUDA")),
])
def test_attention_benchmark_refuses_bad_flags_before_building_layers(capsys, monkeypatch, argv, says):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = script("attention")
    monkeypatch.setattr(bench, "layer_for", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, bench.main, ["--preset", "tiny", *argv]).startswith(says)


# ---------------------------------------------------------------- train_speed, sp_comm, hf_parity

@pytest.mark.parametrize("argv, says", [
    (["--lengths", "0"], "--lengths=0: must be >= 1"),  # was a ZeroDivisionError
    (["--lengths", "-512"], "--lengths=-512: must be >= 1"),  # was train.py's failure, naming train.seq_len
    (["--tokens", "0"], "--tokens=0: must be >= 1"),
    (["--steps", "0"], "--steps=0: must be >= 1"),
    (["--steps", "2", "--skip", "3"], "--skip=3: must be in [0, --steps 2)"),  # was the last step alone, silently
    (["--skip", "-1"], "--skip=-1: must be in [0, --steps 8)"),
])
def test_train_speed_benchmark_refuses_bad_flags_before_training(capsys, monkeypatch, argv, says):
    bench = script("train_speed")
    monkeypatch.setattr(bench, "run_train", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, bench.main, argv).startswith(says)


@pytest.mark.parametrize("argv, says", [
    (["--sp", "0"], "--sp=0: must be >= 1"),  # was a ZeroDivisionError
    (["--sp", "-2"], "--sp=-2: must be >= 1"),  # was a table of negative bytes
    (["--lengths", "0"], "--lengths=0: must be >= 1"),
    (["--sp", "3", "--lengths", "1000"], "--lengths 1000: not a multiple of --sp 3"),
    (["--presets", "foo"], "--presets foo: no conf/model/foo.yaml (choose from "),  # was a FileNotFoundError
])
def test_sp_comm_benchmark_refuses_bad_flags_before_the_table(capsys, monkeypatch, argv, says):
    bench = script("sp_comm")
    monkeypatch.setattr(bench, "table", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, bench.main, argv).startswith(says)


@pytest.mark.parametrize("argv, says", [
    (["--repeats", "0"], "--repeats=0: must be >= 1"),  # was a StatisticsError after sections 1-3
    (["--length", "0"], "--length=0: must be >= 1"),
    (["--decode", "0"], "--decode=0: must be >= 1"),
    (["--length", "64", "--prompt", "100"], "--prompt=100: longer than --length 64"),  # was a 64-token prompt
    (["--positions", "8192", "-5"], "--positions=-5: must be >= 0"),
])
def test_hf_parity_benchmark_refuses_bad_flags_before_building_models(capsys, monkeypatch, argv, says):
    bench = script("hf_parity")
    monkeypatch.setattr(bench, "random_model", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, bench.main, argv).startswith(says)


# ---------------------------------------------------------------- the studies and their ablations

@pytest.mark.parametrize("name", ["quality", "recall"])
@pytest.mark.parametrize("argv, says", [
    (["--scale", "nan"], "--scale=nan: must be a finite number > 0"),  # was "cannot convert float NaN to integer"
    (["--scale", "inf"], "--scale=inf: must be a finite number > 0"),
    (["--lrs", "nan"], "--lrs=nan: give positive, finite learning rates"),  # was a trial run that failed
    (["--lrs", "1e-3,inf"], "--lrs=0.001,inf: give positive, finite learning rates"),  # was a study started
    (["--lrs", "3e-3,3e-3"], "--lrs: 0.003 is given twice"),  # was the same trial run twice
])
def test_study_drivers_refuse_non_finite_and_repeated_values(tmp_path, capsys, monkeypatch, name, argv, says):
    study = script(name)
    monkeypatch.setattr(study, "compose", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, study.main, [tmp_path / "out", *argv]).startswith(says)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    (["--batches", "0"], "--batches=0: must be >= 1"),
    (["--swap", "-1"], "--swap=-1: must be >= 1"),  # was read after loading a model, and said "give less"
    (["--out", "/proc/dsv4-trust-sweep2.json"], "--out=/proc/dsv4-trust-sweep2.json: cannot write this file"),
    ([], "EXP: no finished full run of the quality experiment"),  # was a bare SystemExit, exit code 1
])
def test_quality_ablation_refuses_bad_flags_before_loading(tmp_path, capsys, monkeypatch, argv, says):
    bench = script("quality_ablation")
    monkeypatch.setattr(bench, "ablate", lambda *a: pytest.fail("work started before the check"))
    line = refused(capsys, bench.main, [tmp_path, *argv])
    assert line.startswith(says.replace("EXP", str(tmp_path))), line


def test_quality_ablation_out_probe_leaves_files_as_they_were(tmp_path, monkeypatch):
    """quality_ablation's --out (and evaluate's) go through check_out_file."""
    (tmp_path / "kept.json").write_text("earlier")
    assert check_out_file(tmp_path / "kept.json") is None and (tmp_path / "kept.json").read_text() == "earlier"
    assert check_out_file(tmp_path / "new.json") is None and not (tmp_path / "new.json").exists()


@pytest.mark.parametrize("argv, says", [
    ([UNWRITABLE], f"out={UNWRITABLE}: cannot write in /proc"),  # was a FileNotFoundError
    (["OUT", "--only", ""], "--only: empty"),  # was every ablation, silently
    (["OUT", "--only", ","], "--only: empty"),
    (["OUT", "--jobs", "0"], "--jobs=0: must be >= 1"),  # the message named three flags, not which
    (["OUT", "--eval-every", "-1"], "--eval-every=-1: must be >= 1"),
    (["OUT", "--seeds", "0"], "--seeds=0: must be >= 1"),
])
def test_recall_ablation_refuses_bad_flags_before_any_run(tmp_path, capsys, monkeypatch, argv, says):
    bench = script("recall_ablation")
    monkeypatch.setattr(bench, "_worker", lambda *a: pytest.fail("work started before the check"))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert refused(capsys, bench.main, argv).startswith(says)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- inspect, build_bundled

@pytest.mark.parametrize("argv, says", [
    (["--batches", "0"], "--batches=0: must be >= 1"),  # was one batch, silently
    (["--batches", "-1"], "--batches=-1: must be >= 1"),
    (["--chars", "-1"], "--chars=-1: must be >= 0"),  # was every character but the last
])
def test_inspect_refuses_bad_counts_before_reading(capsys, monkeypatch, argv, says):
    from data_pipelines import inspect

    monkeypatch.setattr(inspect, "load_config", lambda *a: pytest.fail("work started before the check"))
    assert refused(capsys, inspect.main, argv).startswith(says)


def test_inspect_warns_when_batches_hold_fewer_sequences_than_samples(capsys, monkeypatch):
    from data_pipelines import inspect

    def stop(overrides):
        raise inspect.DataError("stop here")

    train = inspect.TrainSettings(micro_batch_size=8)
    monkeypatch.setattr(inspect, "prepare_data", stop)
    monkeypatch.setattr(inspect, "load_config", lambda overrides: (inspect.DataConfig(), train))
    assert inspect.main(["--samples", "20", "--batches", "2"]) == 2
    err = capsys.readouterr().err
    assert "warning: --samples 20: --batches 2 x micro-batch 8 reads only 16 sequences" in err, err
    assert inspect.main(["--samples", "16", "--batches", "2"]) == 2
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["tokenizer", "--corpus", "/nonexistent"], "--corpus=/nonexistent: no such file"),  # was a FileNotFoundError
    (["tokenizer", "--vocab-size", "0"], "--vocab-size=0: must be > 256"),  # was an AssertionError after training
    (["tokenizer", "--out", UNWRITABLE], f"--out={UNWRITABLE}: cannot write this file"),  # was after training
    (["tokenizer", "--out", "DIR"], "--out=DIR: cannot write this file"),
    (["corpus", "--brotli-sdist", "/nonexistent/a", "--sentencepiece-sdist", "/nonexistent/b", "--janeaustenr-deb",
      "/nonexistent/c", "--devil-deb", "/nonexistent/d"], "--brotli-sdist=/nonexistent/a: no such file"),
])
def test_build_bundled_refuses_missing_inputs_and_bad_outputs_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                                                says):
    pytest.importorskip("tokenizers")
    from data_pipelines import build_bundled

    monkeypatch.setattr(build_bundled, "read_documents", lambda *a: pytest.fail("work started before the check"))
    monkeypatch.setattr(build_bundled, "austen_docs", lambda *a: pytest.fail("work started before the check"))
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    assert refused(capsys, build_bundled.main, argv).startswith(says.replace("DIR", str(tmp_path)))


# ---------------------------------------------------------------- evaluate: W&B and the flags of tasks not asked

def test_evaluate_refuses_an_unwritable_wandb_dir_before_loading(tmp_path, capsys):
    from dsv4 import evaluate

    line = refused(capsys, evaluate.main, [tmp_path / "nope", "--wandb", "--wandb-dir", UNWRITABLE])
    assert line.startswith(f"--wandb-dir={UNWRITABLE}: cannot write in /proc"), line  # was after the evaluation
    line = refused(capsys, evaluate.main, [tmp_path / "nope", "--wandb", "--wandb-dir", tmp_path / "w"])
    assert "--wandb-dir" not in line and not (tmp_path / "w").exists()  # the model path is what is wrong; no dir made


@pytest.mark.parametrize("argv, warning", [
    (["--tasks", "ppl", "--recall-docs", "5"], "warning: --recall-docs has no effect: only the recall task(s) read "
                                               "it, and --tasks is ppl"),
    (["--tasks", "recall", "--batches", "2"], "warning: --batches has no effect: only the ppl and positions task(s)"),
    (["--tasks", "ppl", "--passkey-depths", "0.5"], "warning: --passkey-depths has no effect"),
    (["--wandb-dir", "somewhere"], "warning: --wandb-dir has no effect without --wandb"),
])
def test_evaluate_warns_about_flags_nothing_reads(tmp_path, capsys, argv, warning):
    from dsv4 import evaluate

    assert evaluate.main([str(tmp_path / "nope"), *argv, "--device", "cpu"]) == 2  # the warning comes first
    err = capsys.readouterr().err
    assert warning in err and err.count("warning") == 1 and err.index("warning") < err.index("error: path"), err


@pytest.mark.parametrize("argv", [
    ["--tasks", "ppl,positions", "--batches", "2"],
    ["--tasks", "recall", "--recall-docs", "5"],
    ["--tasks", "ppl", "--recall-docs", "256"],  # the default, as if not given
    ["--wandb", "--wandb-dir", "WANDB"],
])
def test_evaluate_does_not_warn_about_flags_that_are_read(tmp_path, capsys, argv):
    from dsv4 import evaluate

    argv = [str(tmp_path / "w") if a == "WANDB" else a for a in argv]
    evaluate.main([str(tmp_path / "nope"), *argv, "--device", "cpu"])
    assert "warning" not in capsys.readouterr().err

"""Raw tracebacks and lost work (issue 19): a bad flag of generate, evaluate, export and the kv-cache / checksum
benchmarks is refused in one line naming the flag, exit code 2, before any work (no model is loaded, nothing is
computed or written). Every case runs the entry point's main(argv) in-process, on a nonexistent model path: the
checks come before the path is read."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dsv4 import evaluate as evaluate_cli
from dsv4 import export as export_cli
from dsv4 import generate as generate_cli

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
UNWRITABLE = "/proc/dsv4-trust-args/x"  # a directory nobody (root included) can create files in


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(capsys, main, argv) -> str:
    """main(argv) must end with code 2 (returned or SystemExit) and a one-line error; -> that line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, flag", [
    (["--temperature", "nan"], "--temperature=nan"),
    (["--temperature", "inf"], "--temperature=inf"),
    (["--temperature=-inf"], "--temperature=-inf"),
    (["--device", "tpu"], "--device=tpu"),
    (["--device", "cuda:x"], "--device=cuda:x"),
    pytest.param(["--device", "cuda"], "--device=cuda", marks=NO_CUDA),
])
def test_generate_refuses_bad_flags_before_loading(tmp_path, capsys, argv, flag):
    line = refused(capsys, generate_cli.main, [tmp_path / "nope", "--prompt", "hi", *argv])
    assert line.startswith(f"error: {flag}:"), line


@pytest.mark.parametrize("flag, value", [("--top-k", "5"), ("--top-p", "0.9")])
def test_generate_warns_that_top_k_p_do_nothing_when_greedy(tmp_path, capsys, flag, value):
    """Greedy stays the default (no surprise sampling); the warning comes before the model is read."""
    generate_cli.main([str(tmp_path / "nope"), "--prompt", "hi", flag, value])
    err = capsys.readouterr().err
    assert f"warning: {flag} has no effect at --temperature 0" in err, err
    generate_cli.main([str(tmp_path / "nope"), "--prompt", "hi", flag, value, "--temperature", "0.7"])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--out", "/proc/dsv4-trust-args.json"], "--out=/proc/dsv4-trust-args.json"),
    (["--device", "tpu"], "--device=tpu"),
    (["--backend", "cuda"], "--backend=cuda"),
    pytest.param(["--device", "cuda"], "--device=cuda", marks=NO_CUDA),
    pytest.param(["--backend", "triton", "--device", "cpu"], "--backend=triton", marks=NO_CUDA),
])
def test_evaluate_refuses_bad_flags_before_loading(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = refused(capsys, evaluate_cli.main, [tmp_path / "nope", *argv])
    assert line.startswith(f"error: {flag}"), line


def test_evaluate_out_probe_leaves_files_as_they_were(tmp_path, capsys):
    """The --out probe creates nothing and truncates nothing (the run then fails on the missing model)."""
    kept = tmp_path / "kept.json"
    kept.write_text("earlier results")
    for out in (kept, tmp_path / "new.json"):
        line = refused(capsys, evaluate_cli.main, [tmp_path / "nope", "--out", out, "--device", "cpu"])
        assert "--out" not in line, line  # the model path is what is wrong
    assert kept.read_text() == "earlier results" and not (tmp_path / "new.json").exists()


@pytest.mark.parametrize("out, words", [
    ("/proc/dsv4-trust-args", "cannot write"),
    (UNWRITABLE, "cannot write"),
    ("FILE", "is a file"),
])
def test_export_refuses_an_unwritable_out_dir_before_any_work(tmp_path, capsys, out, words):
    if out == "FILE":
        out = tmp_path / "a_file"
        out.write_text("")
    line = refused(capsys, export_cli.main, [tmp_path / "nope", "-o", out])
    assert line.startswith(f"error: --out={out}:") and words in line, line


@pytest.mark.parametrize("argv, flag", [
    (["--read-off-tokens", "-5"], "--read-off-tokens=-5"),
    (["--decode-contexts", "1024", "0"], "--decode-contexts=0"),
    (["--decode-steps", "0"], "--decode-steps=0"),
    (["--fp8-error", "/nonexistent"], "--fp8-error=/nonexistent"),
    (["--device", "tpu"], "--device=tpu"),
    pytest.param(["--device", "cuda"], "--device=cuda", marks=NO_CUDA),
    (["--plot", "/proc/dsv4-trust-args.png"], "--plot=/proc/dsv4-trust-args.png"),
])
def test_kv_cache_benchmark_refuses_bad_flags_before_the_tables(capsys, argv, flag):
    line = refused(capsys, script("kv_cache").main, argv)
    assert line.startswith(f"error: {flag}:"), line
    assert not capsys.readouterr().out  # no table was computed


@pytest.mark.parametrize("argv, flag", [
    (["--dir", "/nonexistent"], "--dir=/nonexistent"),
    (["--dir", "/proc"], "--dir=/proc"),
    (["--mib", "0"], "--mib=0"),
    (["--repeats", "0"], "--repeats=0"),
])
def test_checkpoint_checksum_benchmark_refuses_bad_flags_before_writing(capsys, argv, flag):
    line = refused(capsys, script("checkpoint_checksum").main, ["--mib", "1", *argv])
    assert line.startswith(f"error: {flag}:"), line


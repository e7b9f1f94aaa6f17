"""dsv4.run_files.resolve_run_path: what each kind of path a user gives resolves to, under the names rule (train.resume)
and the contents rule (export, loading), and the paths each rule refuses."""

from pathlib import Path

import pytest

from dsv4.config import ConfigError
from dsv4.run_files import CONFIG, LATEST, WEIGHTS, check_latest_tag, resolve_run_path, step_of, tag_for


def make_run(root: Path, tags: tuple[str, ...] = ("step0000002", "step0000004"), latest: str = "step0000004") -> Path:
    ckpt = root / "checkpoints"
    for tag in tags:
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / LATEST).write_text(latest + "\n")
    return root


def test_tags_and_steps():
    assert tag_for(300) == "step0000300" and step_of("step0000300") == 300
    assert step_of("step0000300_universal") is None and step_of(".step0000300.partial") is None


def test_names_rule(tmp_path):
    run = make_run(tmp_path / "run")
    ckpt = run / "checkpoints"
    found = resolve_run_path(run, by="names")
    assert (found.kind, found.run_dir, found.ckpt_dir, found.tag) == ("run", run, ckpt, None)
    found = resolve_run_path(ckpt, by="names")
    assert (found.kind, found.run_dir, found.ckpt_dir, found.tag) == ("checkpoints", run, ckpt, None)
    found = resolve_run_path(ckpt / "step0000002", by="names")
    assert (found.kind, found.run_dir, found.checkpoint) == ("checkpoint", run, ckpt / "step0000002")
    empty = tmp_path / "fresh"  # a run directory that holds no checkpoint yet is still a run directory
    empty.mkdir()
    assert resolve_run_path(empty, by="names").ckpt_dir == empty / "checkpoints"
    with pytest.raises(ConfigError, match=r"^train.resume=x: no such directory$"):
        resolve_run_path(tmp_path / "missing", by="names", key="train.resume=x")


def test_contents_rule(tmp_path):
    run = make_run(tmp_path / "run")
    ckpt = run / "checkpoints"
    for path, kind in ((run, "run"), (ckpt, "checkpoints")):
        found = resolve_run_path(path, by="contents")
        assert (found.kind, found.run_dir, found.checkpoint) == (kind, run, ckpt / "step0000004")  # `latest`
    found = resolve_run_path(ckpt / "step0000002", by="contents")
    assert (found.kind, found.run_dir, found.checkpoint) == ("checkpoint", run, ckpt / "step0000002")
    export = tmp_path / "exported"
    export.mkdir()
    (export / CONFIG).write_text("{}")
    (export / WEIGHTS).write_bytes(b"")
    assert resolve_run_path(export, by="contents", exports=True).export_dir == export
    with pytest.raises(ConfigError, match=r"not a checkpoint directory \(no 'latest' and no \*model_states.pt\)"):
        resolve_run_path(export, by="contents")  # dsv4.export takes no export directory


def test_latest_naming_a_missing_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", latest="step0000009")
    found = resolve_run_path(run, by="contents")
    with pytest.raises(ConfigError, match=r"^PATH: .*latest names checkpoint 'step0000009', but .* does not exist"):
        check_latest_tag(found.ckpt_dir, found.tag, "PATH")

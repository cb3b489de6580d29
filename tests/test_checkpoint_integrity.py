"""Damaged checkpoints are refused with one line naming the file, before any training; a shard
index cannot point outside its checkpoint; ``--resume latest-valid`` falls back to the newest
intact checkpoint and reaches the uninterrupted run's parameters; a torn last line of
``metrics.jsonl`` is dropped on resume, said, and the run still reaches them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from longcat_sim.errors import UserError
from longcat_sim.model.checkpoint import INDEX_NAME, load_pretrained
from longcat_sim.model.config import ConfigError
from longcat_sim.train.checkpoint import MARKER_NAME, STATE_NAME, checkpoint_dirs
from longcat_sim.train.metrics import METRICS_NAME, MetricsLog
from tests.test_train import main_resume, one_line_error


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory) -> dict:
    """An uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("whole") / "run"
    code, stdout, _ = _train(cache, out, "--steps", "4")
    assert code == 0
    return json.loads(stdout)


def _train(cache, out, *extra: str) -> tuple[int, str, str]:
    """``train`` with a fresh capture (module-scoped fixtures cannot take capsys)."""
    import contextlib
    import io

    from longcat_sim.cli import main

    argv = [
        "train", "--model", "tiny", "--run-dir", str(out), "--data-cache", str(cache),
        "--set", f"byte_budget={2**18}", "--set", "warmup_steps=1", "--json", *extra,
    ]  # fmt: skip
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        code = main(argv)
    return code, out_buf.getvalue(), err_buf.getvalue()


def _two_checkpoints(cache, out: Path) -> list[Path]:
    """A run stopped at step 3 with checkpoints at steps 2 and 3."""
    code, _, _ = _train(
        cache, out, "--steps", "4", "--stop-after", "3", "--set", "checkpoint_every=1"
    )
    assert code == 0
    dirs = checkpoint_dirs(out)
    assert [d.name for d in dirs] == ["step-00000002", "step-00000003"]
    return dirs


def _flip_bytes(path: Path, offset_from_end: int = 4096, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) - offset_from_end)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_marker_records_a_digest_of_every_file(cache, tmp_path) -> None:
    newest = _two_checkpoints(cache, tmp_path / "run")[-1]
    marker = json.loads((newest / MARKER_NAME).read_text())
    names = {p.name for p in newest.iterdir()} - {MARKER_NAME}
    assert set(marker["files"]) == names and STATE_NAME in names
    assert all(len(d) == 64 for d in marker["files"].values())


@pytest.mark.parametrize("victim", ["model.safetensors", STATE_NAME, "config.json"])
def test_damaged_file_is_refused_naming_it(cache, tmp_path, capsys, victim) -> None:
    out = tmp_path / "run"
    newest = _two_checkpoints(cache, out)[-1]
    _flip_bytes(newest / victim)
    one_line_error(*main_resume(cache, out, capsys), victim, "--resume latest-valid")


def test_weights_changed_under_an_old_marker_fail_the_parameter_hash(cache, tmp_path, capsys):
    """A marker without file digests and weights without theirs (an older checkpoint): 4 KB of
    random bytes inside the weights still stop the resume, through the recorded parameter
    hash."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    newest = _two_checkpoints(cache, out)[-1]
    marker = json.loads((newest / MARKER_NAME).read_text())
    del marker["files"]
    (newest / MARKER_NAME).write_text(json.dumps(marker))
    weights = newest / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    data = bytearray(weights.read_bytes())
    data[-8192:-4096] = os.urandom(4096)
    weights.write_bytes(bytes(data))
    one_line_error(*main_resume(cache, out, capsys), "param_hash")


def test_latest_valid_falls_back_and_matches_the_whole_run(cache, tmp_path, capsys, whole):
    out = tmp_path / "run"
    newest = _two_checkpoints(cache, out)[-1]
    _flip_bytes(newest / "model.safetensors")
    assert main_resume(cache, out, capsys)[0] == 2  # negative control: plain --resume refuses
    code, stdout, stderr = main_resume_valid(cache, out, capsys)
    assert code == 0, stderr
    resumed = json.loads(stdout)
    assert "skipped" in stderr and "step-00000003" in stderr
    assert resumed["start_step"] == 2
    assert resumed["param_hash"] == whole["param_hash"]


def main_resume_valid(cache, out, capsys):
    from longcat_sim.cli import main

    code = main(
        ["train", "--run-dir", str(out), "--resume", "latest-valid", "--data-cache", str(cache),
         "--json"]
    )  # fmt: skip
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_no_intact_checkpoint_is_one_line(cache, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    for folder in _two_checkpoints(cache, out):
        _flip_bytes(folder / STATE_NAME)
    code, _, stderr = main_resume_valid(cache, out, capsys)
    assert code == 2 and "no checkpoint" in stderr and "is intact" in stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"hidden_size": "wide"}', "damaged"),
    ],
)
def test_damaged_config_json_is_one_error(cache, tmp_path, content, fragment) -> None:
    newest = _two_checkpoints(cache, tmp_path / "run")[-1]
    (newest / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        load_pretrained(newest)


def test_shard_names_stay_inside_the_checkpoint(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_tiny_hf_config()))
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
    with pytest.raises(ConfigError, match="outside the checkpoint directory"):
        load_pretrained(ckpt)
    (ckpt / INDEX_NAME).write_text("[1, 2]")  # negative control of the message: a bad index
    with pytest.raises(ConfigError, match="no weight_map"):
        load_pretrained(ckpt)


def _tiny_hf_config() -> dict:
    from longcat_sim.model.checkpoint import config_to_hf
    from longcat_sim.model.config import get_preset

    return config_to_hf(get_preset("tiny"))


# -- metrics.jsonl ---------------------------------------------------------------------------


def _log(tmp_path: Path, text: bytes) -> MetricsLog:
    (tmp_path / METRICS_NAME).write_bytes(text)
    return MetricsLog(tmp_path)


GOOD = b'{"step": 0, "lm_loss": 5.0}\n{"step": 1, "lm_loss": 4.0}\n'


def test_a_torn_last_line_is_dropped_and_said(tmp_path) -> None:
    log = _log(tmp_path, GOOD + b'{"step": 2, "lm_lo')
    records, torn = log.parse()
    assert [r["step"] for r in records] == [0, 1] and torn
    assert log.truncate(5) is True
    assert (tmp_path / METRICS_NAME).read_bytes().count(b"\n") == 2
    assert log.parse() == (records, False)  # negative control: a whole file is not torn


def test_a_damaged_middle_line_is_one_error(tmp_path) -> None:
    log = _log(tmp_path, b'{"step": 0}\ngarbage\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a step record"):
        log.parse()
    with pytest.raises(UserError, match="not UTF-8"):
        _log(tmp_path, b'{"step": 0}\n\xff\xfe\n').parse()


def test_resume_over_a_torn_metrics_line_matches_the_whole_run(cache, tmp_path, capsys, whole):
    out = tmp_path / "run"
    code, _, _ = _train(cache, out, "--steps", "4", "--stop-after", "2")
    assert code == 0
    with (out / METRICS_NAME).open("ab") as handle:
        handle.write(b'{"step": 2, "lm_loss": 3.')  # a write cut short by a kill
    code, stdout, stderr = main_resume(cache, out, capsys)
    assert code == 0, stderr
    assert "torn last line" in stderr
    resumed = json.loads(stdout)
    assert resumed["param_hash"] == whole["param_hash"]
    steps = [json.loads(line)["step"] for line in (out / METRICS_NAME).read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_a_few_flipped_bytes_in_the_weights_are_refused_by_load_pretrained(cache, tmp_path):
    newest = _two_checkpoints(cache, tmp_path / "run")[-1]
    weights = newest / "model.safetensors"
    intact = weights.read_bytes()
    load_pretrained(newest)  # negative control: the written file loads
    data = bytearray(intact)
    for offset in (len(data) // 2, len(data) // 2 + 1, len(data) - 5):  # inside the tensor data
        data[offset] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model\.safetensors' is damaged: its tensors do not"):
        load_pretrained(newest)


def test_weights_without_a_recorded_digest_still_load(cache, tmp_path) -> None:
    """Files written by other tools carry no digest: nothing to check, they load."""
    from safetensors.torch import load_file, save_file

    newest = _two_checkpoints(cache, tmp_path / "run")[-1]
    weights = newest / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    assert load_pretrained(newest) is not None


def test_a_complete_invalid_last_line_is_damage_not_a_torn_write(tmp_path) -> None:
    """Only a last line without its newline can be a write cut short; one that ends with a
    newline and does not parse is damage, named by file and line."""
    for tail in (b'{"step": 2, "lm_lo\n', b"garbage\n", b'{"step": "2"}\n'):
        with pytest.raises(UserError, match=r"metrics\.jsonl' line 3 is not a step record"):
            _log(tmp_path, GOOD + tail).parse()
    records, torn = _log(tmp_path, GOOD + b"garbage").parse()  # control: no newline, torn
    assert torn and [r["step"] for r in records] == [0, 1]
    assert _log(tmp_path, GOOD + b"\n  \n").parse() == (
        records,
        False,
    )  # blank lines are no records


# -- checkpoint markers ------------------------------------------------------------------------

HASH = "ab" * 32


def _marked(tmp_path: Path, marker) -> Path:
    """A checkpoint folder with two files and ``marker`` (JSON-encoded unless bytes)."""
    from longcat_sim.train.checkpoint import file_digests

    folder = tmp_path / "step-00000002"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}\n")
    (folder / STATE_NAME).write_bytes(b"state")
    if callable(marker):
        marker = marker(file_digests(folder))
    data = marker if isinstance(marker, bytes) else json.dumps(marker).encode()
    (folder / MARKER_NAME).write_bytes(data)
    return folder


def _only(name: str, files: dict[str, str]) -> dict[str, str]:
    return {name: files[name]}


@pytest.mark.parametrize(
    ("marker", "fragment"),
    [
        ({}, "no step"),
        (b"[]", "not a JSON object"),
        ({"step": "2", "param_hash": HASH, "files": {}}, "no step"),
        ({"step": True, "param_hash": HASH}, "no step"),
        ({"step": 2}, "no param_hash"),
        ({"step": 2, "param_hash": 5}, "no param_hash"),
        ({"step": 2, "param_hash": HASH, "files": []}, "files is not a map"),
        ({"step": 2, "param_hash": HASH, "files": {"config.json": "x"}}, "files is not a map"),
        (lambda files: {"step": 2, "param_hash": HASH, "files": _only("config.json", files)},
         f"{STATE_NAME} is not recorded"),
    ],
)  # fmt: skip
def test_a_marker_without_its_fields_is_damaged(tmp_path, marker, fragment) -> None:
    from longcat_sim.train.checkpoint import verify_checkpoint

    folder = _marked(tmp_path, marker)
    named = MARKER_NAME if "not recorded" not in fragment else STATE_NAME
    with pytest.raises(UserError, match=named) as info:
        verify_checkpoint(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_whole_marker_and_an_older_one_pass(tmp_path) -> None:
    """Negative controls: the current format with every file's digest, and an older marker
    (step and param_hash, no files), are accepted."""
    from longcat_sim.train.checkpoint import verify_checkpoint

    whole = _marked(tmp_path, lambda files: {"step": 2, "param_hash": HASH, "files": files})
    assert verify_checkpoint(whole)["step"] == 2
    older = _marked(tmp_path, {"step": 2, "param_hash": HASH})
    assert verify_checkpoint(older) == {"step": 2, "param_hash": HASH}


def test_files_are_hashed_in_chunks(tmp_path, monkeypatch) -> None:
    """Neither the marker's digests nor their check read a whole file into memory."""
    import hashlib

    from longcat_sim.train.checkpoint import file_digests, verify_checkpoint

    folder = _marked(tmp_path, lambda files: {"step": 2, "param_hash": HASH, "files": files})
    expected = hashlib.sha256(b"state").hexdigest()

    def whole_file(self, *args, **kwargs):
        raise AssertionError(f"{self.name} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole_file)
    assert file_digests(folder)[STATE_NAME] == expected
    verify_checkpoint(folder)

"""Hostile and broken input: crafted checkpoints, corrupt weights, incompatible configs, and text
that tries to break line alignment. Each ends in a one-line error or a documented,
line-preserving behaviour; never a traceback, never a hang (an alarm guards every test).

Covered elsewhere, not repeated here: hostile YAML (python tags, anchor bombs, deep nesting),
wrong types, unknown keys and negative sizes in tests/test_config.py and test_config_fuzz.py;
truncated, zeroed, foreign and missing checkpoints in test_checkpoint.py; invalid UTF-8, NUL,
U+2028, a lone CR, CRLF == LF and long-line truncation for translate in test_translate.py;
invalid UTF-8, cut gzip, bad TSV/JSONL and train-side line-count mismatch in test_prepare.py.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import invoke, one_line_error
from helpers.faults import faultkit_experiment, faultkit_random_checkpoint

from mtkit.checkpoint import load_trainer_state
from mtkit.data import load_split
from mtkit.errors import MtkitError
from mtkit.integrity import file_checksum

TRANSLATE_FAST = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def hang_guard():
    """Fail a test that runs past a minute instead of hanging the suite."""

    def expire(signum, frame):
        raise TimeoutError("hang guard: the test ran for more than 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_run(trainkit_prepared, tmp_path_factory) -> Path:
    return faultkit_random_checkpoint(trainkit_prepared, tmp_path_factory.mktemp("hostile_model"))


@pytest.fixture(scope="module")
def trained(trainkit_prepared, tmp_path_factory) -> Path:
    """A config whose run holds a real 4-step checkpoint (for --resume and --init-from)."""
    directory = tmp_path_factory.mktemp("hostile_trained")
    config = faultkit_experiment(trainkit_prepared, directory, train={"max_steps": 4})
    result = invoke("train", "-c", str(config))
    assert result.exit_code == 0, result.stderr
    return config


@pytest.fixture
def trained_copy(trained, tmp_path) -> tuple[Path, Path]:
    """A private copy of ``trained``: (config, checkpoint directory)."""
    shutil.copytree(trained.parent, tmp_path / "copy")
    config = tmp_path / "copy" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["experiment"]["dir"] = str(tmp_path / "copy" / "run")
    config.write_text(yaml.safe_dump(data))
    return config, (tmp_path / "copy" / "run" / "checkpoints" / "last").resolve()


@pytest.fixture
def checkpoint_copy(model_run, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree((model_run / "checkpoints" / "best").resolve(), target)
    return target


def refresh_sizes(directory: Path) -> None:
    """Make meta.json agree with the files again (sizes and checksums), as a forger would: what
    the loaders behind the checksum must still refuse cleanly."""
    meta = json.loads((directory / "meta.json").read_text())
    meta["files"] = {name: (directory / name).stat().st_size for name in meta["files"]}
    meta["checksums"] = {name: file_checksum(directory / name) for name in meta["files"]}
    (directory / "meta.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- crafted checkpoints


class _RunsCode:
    """Unpickling this calls os.system: what a malicious trainer_state.pt would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_code_in_trainer_state_is_refused_and_never_runs(trained_copy, tmp_path, container):
    config, directory = trained_copy
    marker = tmp_path / "pwned"
    state = directory / "trainer_state.pt"
    payload = {"state": _RunsCode(f"touch {marker}"), "optimizer": {}}
    if container == "torch_zip":
        torch.save(payload, state)
    else:
        state.write_bytes(pickle.dumps(payload))
    refresh_sizes(directory)
    # The payload is live: an unrestricted unpickler runs it.
    if container == "torch_zip":  # the pickle inside torch's zip container (no tensors: no persistent ids)
        with zipfile.ZipFile(state) as archive:
            pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    else:
        pickle.loads(state.read_bytes())
    assert marker.exists()
    marker.unlink()

    result = invoke("train", "-c", str(config), "--resume")
    assert not marker.exists()
    # One error line, last; torch's unpickler may print a UserWarning about the protocol first.
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("mtkit: error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert str(state) in errors[0] and "unreadable training state" in errors[0]
    with pytest.raises(MtkitError, match="unreadable training state"):
        load_trainer_state(directory)
    assert not marker.exists()


def _header_length_huge(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))


def _header_not_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"[" * length
    path.write_bytes(bytes(data))


def _rewrite_header(path: Path, edit) -> None:
    """Edit the JSON header of a safetensors file in place, keeping its length (and the file size)."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k.endswith("fc1.weight"))  # a matrix, not tied to another
    text = json.dumps(edit(header, name), separators=(",", ":")).encode()
    assert len(text) <= length
    data[8 : 8 + length] = text.ljust(length)  # safetensors allows trailing spaces in the header
    path.write_bytes(bytes(data))


def _tensor_renamed(path: Path) -> None:
    _rewrite_header(path, lambda header, name: {(k + "x" if k == name else k): v for k, v in header.items()})


def _tensor_reshaped(path: Path) -> None:
    def edit(header, name):
        shape = header[name]["shape"]
        header[name]["shape"] = [shape[-1], *shape[:-1]] if len(shape) > 1 and shape[0] != shape[-1] else [1, *shape]
        return header

    _rewrite_header(path, edit)


def _offsets_backwards(path: Path) -> None:
    def edit(header, name):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [end, begin]  # backwards: a negative length
        return header

    _rewrite_header(path, edit)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_header_length_huge, "unreadable weights"),
        (_header_not_json, "unreadable weights"),
        (_offsets_backwards, "unreadable weights"),
        (_tensor_renamed, "weights do not fit this model"),
        (_tensor_reshaped, "weights do not fit this model"),
    ],
)
def test_corrupt_weights_of_the_right_size_are_refused(checkpoint_copy, damage, reason):
    damage(checkpoint_copy / "model.safetensors")
    refresh_sizes(checkpoint_copy)
    result = invoke("translate", "-m", str(checkpoint_copy), *TRANSLATE_FAST, input="kato rimu\n")
    one_line_error(result, str(checkpoint_copy / "model.safetensors"), reason)


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.yaml"
    path.write_text(edit(path.read_text()))
    refresh_sizes(directory)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda text: text.replace("d_model: 64", "d_model: 128"), "weights do not fit this model"),
        (lambda text: text.replace("encoder_layers: 2", "encoder_layers: 3"), "weights do not fit this model"),
        (lambda text: text + "surprise: 1\n", "not a valid mtkit config: surprise: unknown key"),
        (lambda text: text.replace("model:", "model: !!python/object/apply:os.system ['touch pwned']"), "unreadable"),
        (lambda text: "model: [unclosed\n", "unreadable"),
    ],
    ids=["d_model", "encoder_layers", "unknown_key", "python_tag", "broken_yaml"],
)
def test_checkpoint_config_that_does_not_match_its_weights(checkpoint_copy, edit, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _edit_config(checkpoint_copy, edit)
    result = invoke("translate", "-m", str(checkpoint_copy), *TRANSLATE_FAST, input="kato rimu\n")
    assert not (tmp_path / "pwned").exists()
    one_line_error(result, str(checkpoint_copy), reason)


def test_checkpoint_meta_that_lies_about_the_vocabulary(checkpoint_copy):
    meta = json.loads((checkpoint_copy / "meta.json").read_text())
    meta["src_vocab_size"] += 1
    (checkpoint_copy / "meta.json").write_text(json.dumps(meta))
    result = invoke("translate", "-m", str(checkpoint_copy), *TRANSLATE_FAST, input="kato rimu\n")
    one_line_error(result, "vocabulary sizes differ")


def test_checkpoint_tokenizer_swapped(checkpoint_copy):
    model = next((checkpoint_copy / "tokenizer").glob("*.model"))
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    result = invoke("translate", "-m", str(checkpoint_copy), *TRANSLATE_FAST, input="kato rimu\n")
    one_line_error(result, str(checkpoint_copy / "tokenizer"))


def test_resume_with_a_different_model_shape_is_refused(trained_copy):
    config, directory = trained_copy
    result = invoke("train", "-c", str(config), "--resume", "--set", "model.d_model=32", "--set", "model.heads=2")
    one_line_error(result, str(directory), "checkpoint model differs from the config in model.d_model")


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(trained_copy, tmp_path):
    config, directory = trained_copy
    meta = json.loads((directory / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 64
    (directory / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(directory.parents[1] / "checkpoints" / "best")  # a symlink tree is fine to drop
    data = yaml.safe_load(config.read_text())
    data["experiment"]["dir"] = str(tmp_path / "fresh")
    shutil.copytree(directory.parents[1], tmp_path / "fresh", ignore=shutil.ignore_patterns("checkpoints"))
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(data))
    result = invoke("train", "-c", str(fresh), "--init-from", str(directory))
    one_line_error(result, "trained with a different tokenizer")


# --------------------------------------------------------------------------- hostile text through translate


def translate_bytes(model_run: Path, raw: bytes, tmp_path: Path, *extra: str, backend: str = "torch"):
    source = tmp_path / "in.txt"
    source.write_bytes(raw)
    return invoke("translate", "-m", str(model_run), "-i", str(source), *TRANSLATE_FAST, "--backend", backend, *extra)


def expected_lines(raw: bytes) -> int:
    """Input lines as translate counts them: split on LF only; a final line needs no LF."""
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)


@pytest.mark.parametrize(
    "text",
    [
        "kato \u200frimu\u200f\nsena \u202ekato\u202c\n\u2066isolate\u2069 ka\n",  # RLM, RLO/PDF, LRI/PDI
        "\x1b[31mkato\x1b[0m\n\x07\x08\x7f rimu\n\x1c\x1d\x1e sena\n",  # ANSI escapes, bell, C0/DEL, separators
        "\ufeffkato rimu\n\ufeff\nka\u00adto\u200b\u200d\n",  # BOM at start and alone, soft hyphen, ZW(N)J
        "\U0001f600\U0001f4a9 kato\n\u0000\u0000\n\U0010fffd\ufffe\uffff\n",  # astral, NUL-only, non-characters
    ],
    ids=["bidi", "control", "invisible", "astral"],
)
def test_hostile_characters_keep_one_output_line_per_input_line(model_run, tmp_path, text, backend):
    raw = text.encode("utf-8")
    result = translate_bytes(model_run, raw, tmp_path, backend=backend)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.count(b"\n") == expected_lines(raw)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("line", ["kato rimu sena " * 70_000, "katorimusena" * 90_000], ids=["words", "no_spaces"])
def test_one_mebibyte_line_is_truncated_not_dropped(model_run, tmp_path, line, backend):
    raw = ("kato\n" + line[: 1 << 20] + "\nrimu\n").encode()
    result = translate_bytes(model_run, raw, tmp_path, "--long-lines", "truncate", backend=backend)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.count(b"\n") == 3
    assert "mtkit: warning: line 2: " in result.stderr and "truncated to 1023" in result.stderr


def test_hundred_thousand_empty_lines(model_run, tmp_path, backend):
    raw = b"\n" * 50_000 + b"kato rimu\n" + b"\n" * 49_999 + b"sena"
    result = translate_bytes(model_run, raw, tmp_path, "-o", str(tmp_path / "out.txt"), backend=backend)
    assert result.exit_code == 0, result.stderr
    out = (tmp_path / "out.txt").read_bytes().split(b"\n")
    assert len(out) == 100_002 and out[-1] == b""
    assert [i for i, line in enumerate(out[:-1]) if line] in ([], [50_000], [50_000, 100_000], [100_000])
    assert out[:50_000] == [b""] * 50_000


def test_mixed_line_endings_translate_like_lf(model_run, tmp_path, backend):
    lines = ["kato rimu", "sena", "", "lo pe shi", "ka to"]
    lf = "\n".join(lines).encode() + b"\n"
    mixed = b"kato rimu\r\nsena\n\r\nlo pe shi\r\nka to"  # CRLF, LF, empty CRLF, no final newline
    a, b = translate_bytes(model_run, lf, tmp_path, backend=backend), translate_bytes(model_run, mixed, tmp_path,
                                                                                       backend=backend)
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout and a.stdout.count("\n") == 5
    # A lone CR is not a line break (translate splits on LF only): one line in, one line out.
    lone = translate_bytes(model_run, b"kato\rrimu\nsena\n", tmp_path, backend=backend)
    assert lone.stdout.count("\n") == 2 and "\r" not in lone.stdout


def test_binary_garbage_keeps_line_count(model_run, tmp_path, backend):
    raw = bytes(range(256)) * 64 + b"\n" + os.urandom(4096).replace(b"\n", b"") + b"\n\xff\xfe\x00\n"
    result = translate_bytes(model_run, raw, tmp_path, backend=backend)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.count(b"\n") == expected_lines(raw)
    assert "invalid UTF-8" in result.stderr and "Traceback" not in result.stderr


def test_truncated_gzip_input_is_one_line_and_leaves_no_output(model_run, tmp_path, backend):
    source = tmp_path / "in.txt.gz"
    source.write_bytes(gzip.compress(b"kato rimu\n" * 5000)[:-40])
    out = tmp_path / "out.txt"
    result = invoke("translate", "-m", str(model_run), "-i", str(source), "-o", str(out), *TRANSLATE_FAST,
                    "--backend", backend)
    one_line_error(result, str(source), "unreadable input after line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt.gz"]


# --------------------------------------------------------------------------- hostile text through prepare


@pytest.fixture
def corpus_experiment(trainkit_prepared, tmp_path):
    """Factory: ``make(train_src, train_tgt, valid_src=..., valid_tgt=...) -> config`` (raw bytes),
    an experiment with the session's tokenizer and these corpora."""

    def make(train_src: bytes, train_tgt: bytes, valid_src: bytes = b"kato\n", valid_tgt: bytes = b"otak\n",
             name: str = "exp") -> Path:
        directory = tmp_path / name
        directory.mkdir()
        files = {}
        for key, raw in (("train.src", train_src), ("train.tgt", train_tgt), ("valid.src", valid_src),
                         ("valid.tgt", valid_tgt)):
            (directory / key).write_bytes(raw)
            files[key] = str(directory / key)
        data = {split: {"src": files[f"{split}.src"], "tgt": files[f"{split}.tgt"]} for split in ("train", "valid")}
        return _experiment_with(trainkit_prepared, directory, data)

    return make


def _experiment_with(prepared: dict, directory: Path, data: dict) -> Path:
    config = faultkit_experiment(prepared, directory, data=False)
    loaded = yaml.safe_load(config.read_text())
    loaded["data"] = {**loaded["data"], **data}
    loaded["data"].pop("test", None)
    config.write_text(yaml.safe_dump(loaded))
    return config


def prepared(config: Path, split: str = "train"):
    result = invoke("prepare", "-c", str(config))
    assert result.exit_code == 0, result.stderr
    return load_split(Path(yaml.safe_load(config.read_text())["experiment"]["dir"]), split)


def test_crlf_and_mixed_corpora_prepare_like_lf(corpus_experiment):
    src = [f"kato rimu {i}" for i in range(40)]
    tgt = [f"otak umir {i}" for i in range(40)]
    lf = corpus_experiment("\n".join(src).encode() + b"\n", "\n".join(tgt).encode() + b"\n", name="lf")
    crlf = corpus_experiment("\r\n".join(src).encode() + b"\r\n", "\r\n".join(tgt).encode(), name="crlf")
    mixed_src = "".join(s + ("\r\n" if i % 2 else "\n") for i, s in enumerate(src)).encode()
    mixed = corpus_experiment(mixed_src, "\n".join(tgt).encode(), name="mixed")
    expected = prepared(lf).to_dict()
    assert prepared(crlf).to_dict() == expected
    assert prepared(mixed).to_dict() == expected


def test_control_characters_are_removed_and_bidi_marks_kept(corpus_experiment):
    src = "ka\x00to\x1b[0m\n\ufeffrimu sena\nlo\u200fpe \u202eshi\n".encode()
    tgt = b"a\nb\nc\n"
    data = prepared(corpus_experiment(src, tgt))
    assert data["src"] == ["kato[0m", "rimu sena", "lo\u200fpe \u202eshi"]


def test_huge_and_empty_training_lines_are_counted_drops(corpus_experiment):
    pairs = [(f"kato rimu {i}", f"otak umir {i}") for i in range(30)]
    huge = ("kato rimu sena " * 70_000)[: 1 << 20]
    src = "\n".join([s for s, _ in pairs] + [huge] + [""] * 100_000).encode() + b"\n"
    tgt = "\n".join([t for _, t in pairs] + [huge] + [""] * 100_000).encode() + b"\n"
    config = corpus_experiment(src, tgt)
    assert len(prepared(config)) == 30
    report = json.loads((config.parent / "run" / "data" / "report.json").read_text())["splits"]["train"]
    assert report["read"] == 100_031 and report["dropped"]["empty"] == 100_000 and report["dropped"]["too_long"] == 1


def test_valid_line_count_mismatch_is_one_line(corpus_experiment):
    config = corpus_experiment(b"kato\n", b"otak\n", valid_src=b"a\nb\nc\n", valid_tgt=b"a\nb\n")
    result = invoke("prepare", "-c", str(config))
    one_line_error(result, "valid.src has 3 lines but", "valid.tgt has 2")
    assert not (config.parent / "run" / "data").exists()


def test_validation_pair_longer_than_the_model_is_handled(corpus_experiment):
    pairs = [(f"kato rimu {i}", f"otak umir {i}") for i in range(40)]
    long = " ".join(["kato rimu sena"] * 400)
    config = corpus_experiment(
        "\n".join(s for s, _ in pairs).encode() + b"\n", "\n".join(t for _, t in pairs).encode() + b"\n",
        valid_src=f"kato\n{long}\n".encode(), valid_tgt=f"otak\n{long}\n".encode(),
    )
    prepared(config)
    result = invoke("train", "-c", str(config), "--set", "train.max_steps=2", "--set", "train.valid_every=2")
    assert result.exit_code in (0, 1), result.exception
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# --------------------------------------------------------------------------- hostile text through score


def test_score_hostile_inputs(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes(b"a b c\nd e\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a b c\nd \xff e\n")
    one_line_error(invoke("score", str(ref), "-i", str(bad)), f"{bad}:2: not valid UTF-8")
    one_line_error(invoke("score", str(ref), input=b"a b c\n\xc3\n"), "<stdin>:2: not valid UTF-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    one_line_error(invoke("score", str(empty), "-i", str(empty)), f"{empty} has no lines")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a\x00b c\n\x1b[31md e\n")
    result = invoke("score", str(ref), "-i", str(nul))
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3

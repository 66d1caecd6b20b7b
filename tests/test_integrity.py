"""Integrity of what mtkit writes and reads back (mtkit.integrity): prepared splits and checkpoint
files carry checksums verified before any parser reads them, so a flipped bit or a cut file is a
one-line error naming the file and what to do; damaged Arrow buffers and ids outside the
vocabulary are refused even where the checksum agrees; files from before checksums load with one
warning line. The CTranslate2 conversion counts once its marker, written last, is there; a damaged
one is converted again (explicit backend) or left for PyTorch with one warning (auto); its key
comes from the weights in memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from helpers.backends import needs_ct2
from helpers.cli import invoke, one_line_error
from helpers.faults import faultkit_random_checkpoint

from mtkit.checkpoint import average_checkpoints, load_for_inference, load_trainer_state
from mtkit.data import load_split
from mtkit.errors import MtkitError
from mtkit.integrity import damage, file_checksum

TRANSLATE_FAST = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "2", "--threads", "1"]
PREPARE_AGAIN = "run `mtkit prepare` again"
PICK_ANOTHER = "pick another checkpoint"

pytestmark = pytest.mark.usefixtures("one_thread")


def flipped(data: bytes, offset: int) -> bytes:
    """``data`` with one bit of the byte at ``offset`` flipped (a different bit for each offset)."""
    out = bytearray(data)
    out[offset] ^= 1 << (offset % 8)
    return bytes(out)


def offsets(size: int, count: int) -> list[int]:
    """``count`` offsets spread over a file of ``size`` bytes, plus its first and last bytes."""
    spread = np.linspace(0, size - 1, count).astype(int).tolist()
    return sorted({*range(min(8, size)), *spread, *range(max(size - 8, 0), size)})


def run_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["experiment"]["dir"])


def mtkit_subprocess(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh interpreter: real stderr (logging's warnings included), and a
    crash inside a native library kills only it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mtkit", *args], input=input, capture_output=True, text=True,
                          timeout=300, env=env)


# --------------------------------------------------------------------------- prepared splits


def read_table(run: Path, split: str) -> pa.Table:
    """A prepared split read into memory (not mapped: the file may be replaced under it)."""
    with pa.OSFile(str(run / "data" / f"{split}.arrow")) as source:
        return pa.ipc.open_file(source).read_all().combine_chunks()


def write_table(path: Path, table: pa.Table) -> None:
    """Write ``table`` as an Arrow IPC file and rename it over ``path``."""
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def rewrite_split(run: Path, split: str, table: pa.Table) -> Path:
    """Replace a prepared split with ``table`` and make report.json agree with it again (size
    and checksum), as a forger would: what the checks behind the checksum must still refuse."""
    path = run / "data" / f"{split}.arrow"
    write_table(path, table)
    report_path = run / "data" / "report.json"
    report = json.loads(report_path.read_text())
    report.setdefault("files", {})[path.name] = path.stat().st_size
    report.setdefault("checksums", {})[path.name] = file_checksum(path)
    report_path.write_text(json.dumps(report))
    return path


def test_prepare_records_checksums_and_every_flipped_bit_or_cut_is_one_line(trainkit_experiment):
    run = run_of(trainkit_experiment())
    report = json.loads((run / "data" / "report.json").read_text())
    path = run / "data" / "train.arrow"
    assert report["checksums"] == {name: file_checksum(run / "data" / name) for name in ("train.arrow", "valid.arrow")}
    assert report["files"]["train.arrow"] == path.stat().st_size
    assert report["src_vocab_size"] == report["tgt_vocab_size"] == 120
    pristine = path.read_bytes()
    expected = load_split(run, "train").to_dict()
    for offset in offsets(len(pristine), 64):
        path.write_bytes(flipped(pristine, offset))
        with pytest.raises(MtkitError) as err:
            load_split(run, "train")
        assert str(err.value) == f"{path}: corrupt (checksum mismatch); {PREPARE_AGAIN}", offset
    for cut in offsets(len(pristine), 24)[:-1]:
        path.write_bytes(pristine[:cut])
        with pytest.raises(MtkitError, match=r"truncated or corrupt \(\d+ bytes, expected \d+\)") as err:
            load_split(run, "train")
        assert str(err.value).startswith(f"{path}: ") and str(err.value).endswith(PREPARE_AGAIN), cut
    path.write_bytes(pristine)
    assert load_split(run, "train").to_dict() == expected


def test_a_damaged_split_stops_training_in_one_line(trainkit_experiment):
    config = trainkit_experiment()
    path = run_of(config) / "data" / "train.arrow"
    path.write_bytes(flipped(path.read_bytes(), path.stat().st_size // 2))
    one_line_error(invoke("train", "-c", str(config)), f"{path}: corrupt (checksum mismatch); {PREPARE_AGAIN}")


def test_ids_outside_the_vocabulary_are_one_line_not_an_index_error(trainkit_experiment):
    config = trainkit_experiment()
    run = run_of(config)
    table = read_table(run, "train")
    column = table.column("tgt_ids").chunk(0)
    ids = np.asarray(column.values).copy()
    ids[7] = 120  # the vocabulary has ids 0 to 119
    damaged = pa.ListArray.from_arrays(column.offsets, pa.array(ids))
    path = rewrite_split(run, "train", table.set_column(3, "tgt_ids", damaged))
    message = f"{path}: id 120 in column tgt_ids is outside the tokenizer's vocabulary (0 to 119); {PREPARE_AGAIN}"
    with pytest.raises(MtkitError) as err:
        load_split(run, "train")
    assert str(err.value) == message
    one_line_error(invoke("train", "-c", str(config)), message)


def _offsets_backwards(table: pa.Table) -> pa.Table:
    column = table.column("src_ids").chunk(0)
    offsets = np.asarray(column.offsets).copy()
    offsets[5], offsets[6] = offsets[6], offsets[5]  # a negative length; the first and last stay
    broken = pa.Array.from_buffers(column.type, len(column), [None, pa.py_buffer(offsets)],
                                   children=[column.values])
    return table.set_column(2, "src_ids", broken)


def _invalid_utf8(table: pa.Table) -> pa.Table:
    column = table.column("tgt").chunk(0)
    data = bytearray(column.buffers()[2].to_pybytes())
    data[3] = 0xFF
    broken = pa.Array.from_buffers(pa.string(), len(column), [None, column.buffers()[1], pa.py_buffer(bytes(data))])
    return table.set_column(1, "tgt", broken)


@pytest.mark.parametrize("damage_table", [_offsets_backwards, _invalid_utf8], ids=["offsets", "utf8"])
def test_invalid_arrow_buffers_are_one_line(trainkit_experiment, damage_table):
    config = trainkit_experiment()
    run = run_of(config)
    path = rewrite_split(run, "train", damage_table(read_table(run, "train")))
    # In a subprocess: before the check, pyarrow or training read such buffers out of bounds.
    result = mtkit_subprocess("train", "-c", str(config))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"mtkit: error: {path}: unreadable prepared data (") and PREPARE_AGAIN in lines[0]


def test_a_split_from_before_checksums_loads_with_one_warning(trainkit_experiment, caplog):
    config = trainkit_experiment(train={"max_steps": 1, "valid_every": 1})
    run = run_of(config)
    report_path = run / "data" / "report.json"
    report = json.loads(report_path.read_text())
    expected = load_split(run, "train").to_dict()
    for key in ("files", "checksums", "src_vocab_size", "tgt_vocab_size"):
        report.pop(key, None)
    report_path.write_text(json.dumps(report))
    with caplog.at_level(logging.WARNING, logger="mtkit.integrity"):
        assert load_split(run, "train").to_dict() == expected
        load_split(run, "valid")
        load_split(run, "train")
    assert [r.getMessage() for r in caplog.records] == [
        f"{run / 'data'}: no checksums (written by an older mtkit); read without verifying them"]

    result = mtkit_subprocess("train", "-c", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if "checksum" in line] == [
        f"{run / 'data'}: no checksums (written by an older mtkit); read without verifying them"]

    # Without a checksum the ids are still checked, against the experiment's tokenizer.
    table = read_table(run, "train")
    column = table.column("src_ids").chunk(0)
    ids = np.asarray(column.values).copy()
    ids[0] = -1
    damaged = table.set_column(2, "src_ids", pa.ListArray.from_arrays(column.offsets, pa.array(ids)))
    write_table(run / "data" / "train.arrow", damaged)
    with pytest.raises(MtkitError, match="id -1 in column src_ids is outside the tokenizer's vocabulary"):
        load_split(run, "train")


def test_unverified_splits_never_crash_on_flipped_bits_or_cuts(trainkit_experiment, tmp_path):
    """Without a checksum (a split from before them) damage may go unseen, but the Arrow checks
    and the id range check still make every case a clean error or a load: never a crash."""
    run = run_of(trainkit_experiment())
    report_path = run / "data" / "report.json"
    report = json.loads(report_path.read_text())
    report.pop("files", None), report.pop("checksums", None)
    report_path.write_text(json.dumps(report))
    script = tmp_path / "sweep.py"
    script.write_text(f"""
import json
import logging
from pathlib import Path
from mtkit.data import load_split
from mtkit.errors import MtkitError
logging.disable(logging.WARNING)
run = Path({str(run)!r})
path = run / "data" / "train.arrow"
pristine = path.read_bytes()
outcomes = {{"error": 0, "loaded": 0}}
cases = []
for offset in range(0, len(pristine), max(1, len(pristine) // 1500)):
    data = bytearray(pristine)
    data[offset] ^= 1 << (offset % 8)
    cases.append(data)
cases += [pristine[:cut] for cut in range(0, len(pristine), max(1, len(pristine) // 100))]
for data in cases:
    path.write_bytes(bytes(data))
    try:
        load_split(run, "train").to_dict()
        outcomes["loaded"] += 1
    except MtkitError:
        outcomes["error"] += 1
print(json.dumps(outcomes))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout)
    assert outcomes["error"] > 100 and sum(outcomes.values()) > 1500, outcomes


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def model_run(trainkit_prepared, tmp_path_factory) -> Path:
    return faultkit_random_checkpoint(trainkit_prepared, tmp_path_factory.mktemp("integrity_model"))


@pytest.fixture
def checkpoint(model_run, tmp_path) -> Path:
    """A private copy of the checkpoint directory, without conversions."""
    source = (model_run / "checkpoints" / "best").resolve()
    return Path(shutil.copytree(source, tmp_path / "ckpt", ignore=shutil.ignore_patterns("ctranslate2-*")))


def test_every_flipped_bit_or_cut_in_the_weights_is_one_line(checkpoint):
    meta = json.loads((checkpoint / "meta.json").read_text())
    path = checkpoint / "model.safetensors"
    assert meta["checksums"]["model.safetensors"] == file_checksum(path)
    assert set(meta["checksums"]) == {"model.safetensors", "trainer_state.pt", "config.yaml"}
    pristine = path.read_bytes()
    for offset in offsets(len(pristine), 48):
        path.write_bytes(flipped(pristine, offset))
        with pytest.raises(MtkitError) as err:
            load_for_inference(checkpoint)
        assert str(err.value).startswith(f"{path}: corrupt (checksum mismatch); {PICK_ANOTHER}"), offset
    for cut in offsets(len(pristine), 16)[:-1]:
        path.write_bytes(pristine[:cut])
        with pytest.raises(MtkitError, match=r"truncated or corrupt \(\d+ bytes, expected \d+\); pick another"):
            load_for_inference(checkpoint)
    path.write_bytes(flipped(pristine, len(pristine) // 2))
    one_line_error(invoke("translate", "-m", str(checkpoint), *TRANSLATE_FAST, input="kato rimu\n"),
                   f"{path}: corrupt (checksum mismatch); {PICK_ANOTHER}")


def test_a_flipped_bit_in_the_training_state_is_one_line(checkpoint):
    path = checkpoint / "trainer_state.pt"
    path.write_bytes(flipped(path.read_bytes(), path.stat().st_size - 30))
    with pytest.raises(MtkitError, match=f"trainer_state.pt: corrupt \\(checksum mismatch\\); {PICK_ANOTHER}"):
        load_trainer_state(checkpoint)


def test_a_checkpoint_from_before_checksums_loads_with_one_warning(checkpoint, caplog):
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("checksums", None)
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="mtkit.integrity"):
        load_for_inference(checkpoint)
        load_trainer_state(checkpoint)
    assert [r.getMessage() for r in caplog.records] == [
        f"{checkpoint}: no checksums (written by an older mtkit); read without verifying them"]
    result = mtkit_subprocess("translate", "-m", str(checkpoint), "--backend", "torch", *TRANSLATE_FAST,
                              input="kato rimu\nsena\n")
    assert result.returncode == 0 and result.stdout.count("\n") == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"{checkpoint}: no checksums (written by an older mtkit); read without verifying them"]


def test_an_averaged_checkpoint_carries_its_own_checksums(checkpoint, tmp_path, caplog):
    out = average_checkpoints([checkpoint, checkpoint], tmp_path / "average")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checksums"] == {name: file_checksum(out / name) for name in ("model.safetensors", "config.yaml")}
    with caplog.at_level(logging.WARNING, logger="mtkit.integrity"):
        load_for_inference(out)
    assert caplog.records == []
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(flipped(weights.read_bytes(), 4000))
    with pytest.raises(MtkitError, match="corrupt \\(checksum mismatch\\)"):
        average_checkpoints([checkpoint], tmp_path / "again")


def test_a_checksum_of_an_unknown_kind_is_named(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"abc")
    assert damage(path, 3, file_checksum(path)) is None
    assert damage(path, 4, file_checksum(path)) == "truncated or corrupt (3 bytes, expected 4)"
    assert "unknown kind 'sha3'" in str(damage(path, None, "sha3:00"))
    assert damage(tmp_path / "gone", None, file_checksum(path)) == "missing"


# --------------------------------------------------------------------------- the CTranslate2 conversion


@needs_ct2
def test_a_conversion_counts_once_its_marker_is_written_last(checkpoint, monkeypatch):
    from mtkit.engines import ctranslate2 as ct2engine

    synced: list[str] = []
    real = ct2engine.fsync_path
    monkeypatch.setattr(ct2engine, "fsync_path", lambda path: (synced.append(Path(path).name), real(path))[1])
    loaded = load_for_inference(checkpoint)
    converted = ct2engine.ct2_model_dir(loaded, warn=pytest.fail)
    marker = json.loads((converted / ct2engine.CT2_MARKER).read_text())
    files = sorted(p.name for p in converted.iterdir() if p.name != ct2engine.CT2_MARKER)
    assert sorted(marker["checksums"]) == files and "model.bin" in files
    assert synced[-2] == ct2engine.CT2_MARKER and set(synced[:-2]) == set(files)  # then the parent directory

    # Without its marker (a killed or older conversion) it does not count: converted again,
    # even where a damaged one would be left alone.
    (converted / ct2engine.CT2_MARKER).unlink()
    (converted / "model.bin").write_bytes(b"partial")
    again = ct2engine.ct2_model_dir(loaded, warn=pytest.fail, repair=False)
    assert again == converted and ct2engine._conversion_damage(converted) is None


@needs_ct2
def test_every_flipped_bit_or_cut_in_a_conversion_is_caught(checkpoint):
    from mtkit.engines import ctranslate2 as ct2engine

    loaded = load_for_inference(checkpoint)
    converted = ct2engine.ct2_model_dir(loaded, warn=pytest.fail)
    pristine = {p.name: p.read_bytes() for p in converted.iterdir()}
    cases = [(name, offset, "flip") for name, data in pristine.items()
             for offset in offsets(len(data), 12 if name == "model.bin" else 2)[:: 1 if name == "model.bin" else 6]]
    cases += [(name, cut, "cut") for name, data in pristine.items() for cut in (0, len(data) // 2, len(data) - 1)]
    for name, offset, kind in cases:
        path = converted / name
        path.write_bytes(flipped(pristine[name], offset) if kind == "flip" else pristine[name][:offset])
        try:
            ct2engine.ct2_model_dir(loaded, warn=pytest.fail, repair=False)  # auto: left for PyTorch
        except ct2engine.DamagedConversion as err:
            assert str(err).startswith(f"{converted}: damaged CTranslate2 model ("), err
        else:  # only a change that leaves the marker saying the same (its last newline cut)
            assert name == ct2engine.CT2_MARKER and json.loads(path.read_bytes()) == json.loads(pristine[name])
            path.write_bytes(pristine[name])
            continue
        said: list[str] = []
        assert ct2engine.ct2_model_dir(loaded, warn=said.append) == converted  # explicit: converted again
        assert len(said) == 1 and "converting it again" in said[0], (name, offset, kind, said)
        assert {p.name: p.read_bytes() for p in converted.iterdir()} == pristine, (name, offset, kind)


@needs_ct2
def test_auto_translates_with_torch_after_one_warning_and_explicit_converts_again(checkpoint):
    torch_out = invoke("translate", "-m", str(checkpoint), "--backend", "torch", *TRANSLATE_FAST,
                       input="kato rimu\nsena\n")
    ct2_out = invoke("translate", "-m", str(checkpoint), "--backend", "ctranslate2", *TRANSLATE_FAST,
                     input="kato rimu\nsena\n")
    assert torch_out.exit_code == 0 and ct2_out.exit_code == 0, ct2_out.stderr
    [converted] = checkpoint.glob("ctranslate2-*")
    model = converted / "model.bin"
    model.write_bytes(flipped(model.read_bytes(), model.stat().st_size // 3))

    auto = invoke("translate", "-m", str(checkpoint), *TRANSLATE_FAST, input="kato rimu\nsena\n")
    assert auto.exit_code == 0 and auto.stdout == torch_out.stdout, auto.stderr
    warnings = [line for line in auto.stderr.splitlines() if line.startswith("mtkit: warning: ")]
    assert warnings == [f"mtkit: warning: {converted}: damaged CTranslate2 model (model.bin corrupt (checksum "
                        "mismatch)); translating with PyTorch (decode.backend=ctranslate2 converts it again)"]
    assert "(the CTranslate2 model is damaged; " in auto.stderr

    explicit = invoke("translate", "-m", str(checkpoint), "--backend", "ctranslate2", *TRANSLATE_FAST,
                      input="kato rimu\nsena\n")
    assert explicit.exit_code == 0 and explicit.stdout == ct2_out.stdout, explicit.stderr
    assert "converting it again" in explicit.stderr


@needs_ct2
def test_the_conversion_key_comes_from_the_weights_loaded(checkpoint):
    """A checkpoint whose weights file changes after loading: the conversion is named after
    the weights in memory, so neither load reuses the other's conversion."""
    import torch
    from safetensors.torch import save_model

    from mtkit.engines import ctranslate2 as ct2engine

    first = load_for_inference(checkpoint)
    key = ct2engine._ct2_key(first)
    other = load_for_inference(checkpoint)
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.add_(0.5)
    weights = checkpoint / "model.safetensors"
    save_model(other.model, str(weights), metadata={"format": "pt"})
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"]["model.safetensors"] = weights.stat().st_size
    meta.setdefault("checksums", {})["model.safetensors"] = file_checksum(weights)
    (checkpoint / "meta.json").write_text(json.dumps(meta))

    assert ct2engine._ct2_key(first) == key  # the file changed, the weights in memory did not
    second = load_for_inference(checkpoint)
    assert ct2engine._ct2_key(second) != key
    assert ct2engine.ct2_model_dir(first, warn=pytest.fail).name == ct2engine.CT2_PREFIX + key
    assert ct2engine.ct2_model_dir(second, warn=pytest.fail).name != ct2engine.CT2_PREFIX + key

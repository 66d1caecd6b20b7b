"""``mtkit backtranslate`` (mtkit.backtranslate) on a tiny random reverse model: aligned files
that add up with the report, beam output equal to ``mtkit translate``'s, seeded sampling and
noise, the filters, tags, and a killed run that resumes to the files of an uninterrupted one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import invoke, one_line_error
from helpers.data import copy_experiment, tokdata_pairs

from mtkit.backtranslate import (
    DROP_REASONS,
    PARTIAL,
    Filters,
    Noise,
    Settings,
    backtranslate,
    drop_reason,
    noise_words,
)
from mtkit.errors import MtkitError

pytestmark = pytest.mark.usefixtures("one_thread")

SRC, TGT = "synthetic.en", "synthetic.de"  # the reverse model translates de -> en


@pytest.fixture(scope="module")
def reverse_run(trainkit_prepared, tmp_path_factory) -> Path:
    """A tiny de->en run trained 150 steps (a few seconds) on the synthetic pairs, so that its
    translations vary from line to line and word to word (a random model repeats one token);
    its data.tgt_lang (en) is the synthetic source's language."""
    import torch

    from mtkit.config import load_config
    from mtkit.train import train

    root = tmp_path_factory.mktemp("reverse")
    prepared = {**trainkit_prepared, "data": {**trainkit_prepared["data"], "src_lang": "de", "tgt_lang": "en"}}
    config = copy_experiment(prepared, root / "run", root / "run.yaml",
                             train={"max_steps": 150, "valid_every": 150, "warmup_steps": 10, "max_tokens": 600,
                                    "keep_last": 1})
    torch.manual_seed(0)
    train(load_config(config))
    return root / "run"


@pytest.fixture(scope="module")
def mono(tmp_path_factory) -> Path:
    """40 monolingual lines (in the reverse model's source language), two of them empty or
    blank (always dropped as empty)."""
    lines = [src for src, _ in tokdata_pairs(38, seed=7)]
    lines[5:5] = [""]
    lines[20:20] = ["   "]
    path = tmp_path_factory.mktemp("mono") / "mono.de"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def run_cli(reverse_run: Path, mono: Path, out: Path, *args: str) -> dict:
    result = invoke("backtranslate", "-m", str(reverse_run), "-i", str(mono), "-o", str(out), "--backend", "torch",
                    "--beam", "3", "--chunk-lines", "16", *args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_cli_writes_aligned_files_that_add_up_with_the_report(reverse_run, mono, tmp_path):
    report = run_cli(reverse_run, mono, tmp_path / "bt")
    src, tgt = lines_of(tmp_path / "bt" / SRC), lines_of(tmp_path / "bt" / TGT)
    assert len(src) == len(tgt) == report["kept"] > 0
    assert report["lines_read"] == len(lines_of(mono)) == 40
    assert report["kept"] + sum(report["dropped"].values()) == report["lines_read"]
    assert set(report["dropped"]) == set(DROP_REASONS) and report["dropped"]["empty"] == 2
    assert report["method"] == "beam" and report["decode"]["beam"] == 3 and not report["decode"]["sampling"]
    assert report["seconds"] >= 0
    assert sorted(p.name for p in (tmp_path / "bt").iterdir()) == sorted([SRC, TGT, "report.json"])
    # Each kept target is a monolingual line, in input order.
    mono_lines = lines_of(mono)
    positions = [mono_lines.index(line) for line in tgt]
    assert positions == sorted(positions)


def test_beam_output_equals_translate_for_the_kept_lines(reverse_run, mono, tmp_path):
    run_cli(reverse_run, mono, tmp_path / "bt")
    result = invoke("translate", "-m", str(reverse_run), "-i", str(mono), "--backend", "torch", "--beam", "3")
    assert result.exit_code == 0, result.stderr
    translations = result.stdout.splitlines()
    expected = [(hyp, " ".join(line.split())) for hyp, line in zip(translations, lines_of(mono), strict=True)
                if drop_reason(hyp, line, Filters()) is None]
    assert expected
    assert list(zip(lines_of(tmp_path / "bt" / SRC), lines_of(tmp_path / "bt" / TGT), strict=True)) == expected


def test_sampling_with_a_seed_is_reproducible_and_differs_from_beam(reverse_run, mono, tmp_path, backend):
    def run(name: str, *args: str) -> list[str]:
        run_cli(reverse_run, mono, tmp_path / name, "--backend", backend, "--max-ratio", "100", *args)
        return lines_of(tmp_path / name / SRC)

    first = run("a", "--method", "sampling", "--seed", "3")
    assert run("b", "--method", "sampling", "--seed", "3") == first
    assert run("c", "--method", "sampling", "--seed", "4") != first
    assert run("d") != first
    report = json.loads((tmp_path / "a" / "report.json").read_text(encoding="utf-8"))
    assert report["decode"]["sampling"] and report["seed"] == 3


def test_noised_beam_with_only_swap_keeps_each_lines_words(reverse_run, mono, tmp_path):
    run_cli(reverse_run, mono, tmp_path / "beam")
    run_cli(reverse_run, mono, tmp_path / "noised", "--method", "noised-beam", "--delete-prob", "0",
            "--replace-prob", "0", "--seed", "5")
    beam, noised = lines_of(tmp_path / "beam" / SRC), lines_of(tmp_path / "noised" / SRC)
    assert lines_of(tmp_path / "beam" / TGT) == lines_of(tmp_path / "noised" / TGT)  # filtered before the noise
    assert [Counter(line.split()) for line in noised] == [Counter(line.split()) for line in beam]
    assert noised != beam


def test_noised_beam_deletes_and_replaces_and_is_seeded(reverse_run, mono, tmp_path):
    args = ("--method", "noised-beam", "--delete-prob", "0.3", "--replace-prob", "0.3", "--filler", "<X>")
    run_cli(reverse_run, mono, tmp_path / "a", *args, "--seed", "1")
    run_cli(reverse_run, mono, tmp_path / "b", *args, "--seed", "1")
    run_cli(reverse_run, mono, tmp_path / "beam")
    noised, beam = lines_of(tmp_path / "a" / SRC), lines_of(tmp_path / "beam" / SRC)
    assert noised == lines_of(tmp_path / "b" / SRC)
    assert sum(len(line.split()) for line in noised) < sum(len(line.split()) for line in beam)
    assert any("<X>" in line.split() for line in noised)
    assert all(line.split() for line in noised)


def test_noise_deletes_at_its_rate_and_moves_no_word_further_than_the_swap_distance():
    words = [f"w{i}" for i in range(20_000)]
    rng = np.random.default_rng(0)
    kept = noise_words(words, rng, Noise(delete=0.1, replace=0.0, swap=0))
    assert abs(1 - len(kept) / len(words) - 0.1) < 0.01
    blanked = noise_words(words, rng, Noise(delete=0.0, replace=0.2, swap=0, filler="<b>"))
    assert abs(blanked.count("<b>") / len(words) - 0.2) < 0.01
    shuffled = noise_words(words, rng, Noise(delete=0.0, replace=0.0, swap=3))
    moves = [abs(position - int(word[1:])) for position, word in enumerate(shuffled)]
    assert sorted(shuffled) == sorted(words) and max(moves) == 3
    # Fixed seed, fixed output; never empty.
    again = noise_words(words[:12], np.random.default_rng(1), Noise())
    assert again == noise_words(words[:12], np.random.default_rng(1), Noise())
    assert noise_words(["only"], np.random.default_rng(2), Noise(delete=1.0)) == ["only"]


@pytest.mark.parametrize("source, target, filters, reason", [
    ("a b c", "x y z", Filters(), None),
    ("", "x y z", Filters(), "empty"),
    ("a b", "  ", Filters(), "empty"),
    ("das  ist gut", "das ist\tgut", Filters(), "copy"),
    ("a", "x y z", Filters(), None),
    ("a", "x y z w", Filters(), "ratio"),
    ("a b c d e f g", "x y", Filters(max_ratio=3.5), None),
    ("a b c d e f g h", "x y", Filters(max_ratio=3.5), "ratio"),
    ("a b c d", "x y z w", Filters(max_words=3), "too_long"),
    ("a b c", "x y z", Filters(max_words=3), None),
])
def test_drop_reason(source, target, filters, reason):
    assert drop_reason(source, target, filters) == reason


def test_tag_prefixes_every_source_line(reverse_run, mono, tmp_path):
    run_cli(reverse_run, mono, tmp_path / "beam")
    run_cli(reverse_run, mono, tmp_path / "tagged", "--tag", "<BT>")
    tagged = lines_of(tmp_path / "tagged" / SRC)
    assert tagged == ["<BT> " + line for line in lines_of(tmp_path / "beam" / SRC)]
    assert lines_of(tmp_path / "tagged" / TGT) == lines_of(tmp_path / "beam" / TGT)


class Killed(Exception):
    """Stands for a kill after the first chunk is saved."""


def kill_after_first_chunk(done: int) -> None:
    raise Killed


@pytest.mark.parametrize("method", ["beam", "sampling", "noised-beam"])
def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_one(reverse_run, mono, tmp_path, backend, method):
    from mtkit.checkpoint import load_for_inference

    loaded = load_for_inference(reverse_run)
    decode = loaded.config.decode.model_copy(update={"backend": backend, "beam": 3})
    settings = Settings(method=method, seed=9, chunk_lines=16, filters=Filters(max_ratio=100))
    whole = backtranslate(loaded, mono, tmp_path / "whole", settings, decode, threads=1)

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        backtranslate(loaded, mono, out, settings, decode, threads=1, on_chunk=kill_after_first_chunk)
    assert [p.name for p in out.iterdir() if p.name != ".lock"] == [PARTIAL]  # nothing that looks complete
    state = json.loads((out / PARTIAL / "state.json").read_text(encoding="utf-8"))
    assert state["lines_done"] == 16
    # A kill while the next chunk was being written: bytes after what the state vouches for.
    with open(out / PARTIAL / SRC, "ab") as handle:
        handle.write(b"half a line " * 1000)
    said: list[str] = []
    resumed = backtranslate(loaded, mono, out, settings, decode, threads=1, say=said.append)
    assert any("resuming after line 16" in line for line in said)
    for name in (SRC, TGT):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    assert not (out / PARTIAL).exists()


def test_a_changed_input_or_other_options_refuse_to_resume(reverse_run, mono, tmp_path):
    from mtkit.checkpoint import load_for_inference

    loaded = load_for_inference(reverse_run)
    settings = Settings(chunk_lines=16)
    changed = tmp_path / "mono.de"
    changed.write_bytes(mono.read_bytes())
    out = tmp_path / "bt"
    with pytest.raises(Killed):
        backtranslate(loaded, changed, out, settings, threads=1, on_chunk=kill_after_first_chunk)
    with open(changed, "a", encoding="utf-8") as handle:
        handle.write("noch eine Zeile\n")
    with pytest.raises(MtkitError, match="unfinished .*the input file.*--restart"):
        backtranslate(loaded, changed, out, settings, threads=1)
    # Through the CLI: one line naming what changed.
    result = invoke("backtranslate", "-m", str(reverse_run), "-i", str(changed), "-o", str(out),
                    "--chunk-lines", "16", "--method", "sampling")
    one_line_error(result, str(out), "method", "the input file", "--restart")
    report = run_cli(reverse_run, changed, out, "--restart")  # starts over
    assert report["lines_read"] == 41 and not (out / PARTIAL).exists()


def test_a_finished_output_is_kept_and_other_settings_refuse(reverse_run, mono, tmp_path):
    out = tmp_path / "bt"
    run_cli(reverse_run, mono, out)
    before = (out / SRC).read_bytes()
    result = invoke("backtranslate", "-m", str(reverse_run), "-i", str(mono), "-o", str(out), "--backend", "torch",
                    "--beam", "3", "--chunk-lines", "16")
    assert result.exit_code == 0 and "already complete" in result.stderr, result.stderr
    assert (out / SRC).read_bytes() == before
    result = invoke("backtranslate", "-m", str(reverse_run), "-i", str(mono), "-o", str(out), "--backend", "torch",
                    "--beam", "3", "--chunk-lines", "16", "--tag", "<BT>")
    one_line_error(result, str(out), "tag", "--restart")


def test_bad_input_gives_one_line_errors(reverse_run, mono, tmp_path):
    def run(*args: str):
        return invoke("backtranslate", *args)

    one_line_error(run("-m", str(reverse_run), "-i", str(tmp_path / "missing.de"), "-o", str(tmp_path / "o")),
                   "missing.de", "not found")
    one_line_error(run("-m", str(tmp_path), "-i", str(mono), "-o", str(tmp_path / "o")), str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n", encoding="utf-8")
    one_line_error(run("-m", str(reverse_run), "-i", str(mono), "-o", str(other)), str(other), "other files")
    assert (other / "notes.txt").exists()
    one_line_error(run("-m", str(reverse_run), "-i", str(mono), "-o", str(tmp_path / "o"), "--tag", "a b"), "--tag")
    one_line_error(run("-m", str(reverse_run), "-i", str(mono), "-o", str(tmp_path / "o"), "--method",
                       "noised-beam", "--delete-prob", "2"), "--delete-prob")
    one_line_error(run("-m", str(reverse_run), "-i", str(mono), "-o", str(reverse_run / "checkpoints")),
                   "would replace the model")
    one_line_error(run("-m", str(reverse_run), "-i", "-", "-o", str(tmp_path / "o")), "--input", "stdin")


# --------------------------------------------------------------------------- the pipeline's stage


def test_pipeline_backtranslates_then_trains_on_the_mix(reverse_run, mono, tmp_path):
    """``backtranslation`` in a config: the pipeline's backtranslate stage writes the synthetic
    pairs into the experiment, the tokenizer gets the tag, prepare puts them after the real
    pairs, and training draws them by their weight. A rerun skips every stage; another weight
    re-runs training (not the back-translation, nor the data); another method re-runs all."""
    import copy

    from helpers.data import TRAINKIT_SECTIONS, tokdata_experiment

    from mtkit.data import split_groups
    from mtkit.tokenizer import read_meta

    sections = copy.deepcopy(TRAINKIT_SECTIONS)
    config = tokdata_experiment(tmp_path, 200, data={"src_lang": "en", "tgt_lang": "de"},
                                backtranslation={"model": str(reverse_run), "monolingual": str(mono),
                                                 "method": "sampling", "top_k": 10, "tag": "<BT>", "weight": 0.5},
                                **sections)
    run = tmp_path / "run"

    def pipeline(*overrides: str):
        result = invoke("pipeline", "-c", str(config), *[arg for item in overrides for arg in ("--set", item)])
        assert result.exit_code == 0, result.output
        return {stage: ("skipped" if "up to date" in line else "ran")
                for line in result.output.splitlines() if line.startswith("pipeline: ")
                for stage in [line.split(":")[1].strip()] if "up to date" in line or "done in" in line}

    assert pipeline() == dict.fromkeys(["backtranslate", "tokenizer", "prepare", "train", "select", "translate",
                                        "score"], "ran")
    report = json.loads((run / "backtranslation" / "report.json").read_text())
    synthetic = lines_of(run / "backtranslation" / SRC)
    assert report["kept"] == len(synthetic) > 20 and all(line.startswith("<BT> ") for line in synthetic)
    assert "<BT>" in read_meta(run / "tokenizer")["user_symbols"]
    groups = split_groups(run, "train")
    assert len(groups) == 2 and groups[1].end - groups[1].start == report["kept"]  # real, then synthetic
    assert set(pipeline().values()) == {"skipped"}
    again = pipeline("backtranslation.weight=2")
    assert again["backtranslate"] == again["tokenizer"] == again["prepare"] == "skipped" and again["train"] == "ran"
    assert pipeline("backtranslation.weight=2", "backtranslation.method=beam")["backtranslate"] == "ran"


def test_a_second_backtranslation_into_the_same_output_stops_naming_the_first(reverse_run, mono, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mtkit.rundir import exclusive\n"
         f"with exclusive(Path({str(out)!r}), 'mtkit backtranslate -o first'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = invoke("backtranslate", "-m", str(reverse_run), "-i", str(mono), "-o", str(out))
        one_line_error(result, f"{out}: in use by pid {holder.pid} (mtkit backtranslate -o first)")
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(reverse_run, mono, out)["lines_read"] == 40  # a lock left by a killed process never blocks
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", SRC, TGT])

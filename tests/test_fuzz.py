"""Property-based tests: translate keeps one output line per input line whatever the text, and
``mtkit score`` equals sacrebleu on arbitrary hypotheses and references.

(Config fuzzing lives in tests/test_config_fuzz.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.faults import faultkit_random_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtkit.checkpoint import load_for_inference
from mtkit.cli import app
from mtkit.translate import Translator

SACREBLEU = Path(sys.executable).parent / "sacrebleu"
FAST = dict(beam=1, max_len_a=0.0, max_len_b=2)
FAST_FLAGS = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "2"]


def messages(stderr: str) -> list[str]:
    """stderr's lines but the one that names the search backend ``auto`` chose."""
    return [line for line in stderr.splitlines() if not line.startswith("mtkit: backend: ")]
# Any code point but surrogates (which cannot be written as UTF-8).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SOME_LINE_BREAKS = st.text(st.sampled_from(list("ab \n\r\t\x0b\x0c\x1c\x85\u2028\u2029\x00\u200f")), max_size=20)


@pytest.fixture(scope="module")
def model_run(trainkit_prepared, tmp_path_factory) -> Path:
    return faultkit_random_checkpoint(trainkit_prepared, tmp_path_factory.mktemp("fuzz_model"))


@pytest.fixture(scope="module")
def translator(model_run) -> Translator:
    loaded = load_for_inference(model_run)
    return Translator(loaded.model, loaded.tokenizers, loaded.config.decode.model_copy(update=FAST))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- translate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(TEXT | SOME_LINE_BREAKS, max_size=12))
def test_translator_returns_one_line_per_input_line(translator, lines):
    out = translator.translate(lines)
    assert len(out) == len(lines)
    for source, target in zip(lines, out, strict=True):
        assert len(target.splitlines()) <= 1 and "\n" not in target
        if not source.strip():
            assert target == ""


def input_lines(raw: bytes) -> int:
    """Lines as ``mtkit translate`` reads them: split on LF only; a last line needs no LF."""
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(TEXT | SOME_LINE_BREAKS, max_size=8).map("\n".join))
def test_cli_returns_one_line_per_input_line(model_run, text):
    raw = text.encode("utf-8")
    result = CliRunner().invoke(app, ["translate", "-m", str(model_run), *FAST_FLAGS], input=raw)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout_bytes.count(b"\n") == input_lines(raw)
    assert messages(result.stderr) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_cli_on_arbitrary_bytes_keeps_line_count(model_run, raw):
    result = CliRunner().invoke(app, ["translate", "-m", str(model_run), *FAST_FLAGS], input=raw)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout_bytes.count(b"\n") == input_lines(raw)
    assert all(line.startswith("mtkit: warning: <stdin>:") for line in messages(result.stderr))


def test_cli_subprocess_on_arbitrary_text(model_run, tmp_path):
    """The real entry point on a file of hostile lines (one process: imports are slow)."""
    import random

    rng = random.Random(0)
    alphabet = "ab \r\t\x00\x0b\x0c\x1c\x85\u2028\u2029\u200f\u202e\ufeff\U0001f600é\ufffd"
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    source = tmp_path / "in.txt"
    source.write_bytes("\n".join(lines).encode() + b"\xff\xfe\n")
    out = tmp_path / "out.txt"
    done = subprocess.run(
        [sys.executable, "-m", "mtkit", "translate", "-m", str(model_run), "-i", str(source), "-o", str(out),
         *FAST_FLAGS, "--threads", "1", "--chunk-lines", "64"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().count(b"\n") == 300
    byte = len(lines[-1].encode())
    assert messages(done.stderr) == [f"mtkit: warning: {source}:300: invalid UTF-8 (byte {byte}) replaced with U+FFFD"]


# --------------------------------------------------------------------------- score


LINE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n"), max_size=25) | st.sampled_from(
    ["", " ", "a b c", "ein Mann .", "der Hund läuft", "\t x \r", "日本語 テスト"])


def _sacrebleu_like_cli(hyp: Path, ref: Path) -> list[tuple[str, str, float]]:
    """What the sacrebleu command computes: its own reader (text mode, newline='\\n',
    rstrip) and its metric objects."""
    from sacrebleu.metrics import BLEU, CHRF, TER
    from sacrebleu.utils import smart_open

    hyps = [line.rstrip() for line in smart_open(str(hyp))]
    refs = [line.rstrip() for line in smart_open(str(ref))]
    out = []
    for metric in (BLEU(), CHRF(), TER()):
        result = metric.corpus_score(hyps, [refs])
        out.append((result.name, metric.get_signature().format(), result.score))
    return out


def _write_pair(tmp_path: Path, pairs: list[tuple[str, str]]) -> tuple[Path, Path]:
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("".join(h + "\n" for h, _ in pairs), encoding="utf-8", newline="")
    ref.write_text("".join(r + "\n" for _, r in pairs), encoding="utf-8", newline="")
    return hyp, ref


def _mtkit_score(hyp: Path, ref: Path) -> list[dict]:
    result = CliRunner().invoke(app, ["score", str(ref), "-i", str(hyp), "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(LINE, LINE), min_size=1, max_size=6))
def test_score_equals_sacrebleu(tmp_path, pairs):
    hyp, ref = _write_pair(tmp_path, pairs)
    got = _mtkit_score(hyp, ref)
    expected = _sacrebleu_like_cli(hyp, ref)
    assert [(g["name"], g["signature"]) for g in got] == [(name, sig) for name, sig, _ in expected]
    for g, (_, _, value) in zip(got, expected, strict=True):
        assert g["score"] == pytest.approx(value, abs=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(LINE, LINE), min_size=1, max_size=6))
def test_score_equals_the_sacrebleu_command(tmp_path, pairs):
    hyp, ref = _write_pair(tmp_path, pairs)
    done = subprocess.run([str(SACREBLEU), str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "ter", "-w", "4"],
                          capture_output=True, text=True, check=True, timeout=60)
    expected = json.loads(done.stdout)
    got = _mtkit_score(hyp, ref)
    assert [(g["name"], g["signature"]) for g in got] == [(e["name"], e["signature"]) for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)

"""The string-level translator and ``mtkit translate`` on a tiny random checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.backends import make_translator
from typer.testing import CliRunner

from mtkit.batching import pack
from mtkit.checkpoint import save_checkpoint
from mtkit.cli import app
from mtkit.config import Config, DecodeConfig, ModelConfig, TokenizerConfig, resolve_decode
from mtkit.models.encoder_decoder import Transformer
from mtkit.tokenizer import train_tokenizers
from mtkit.translate import Translation, Translator, one_line
from mtkit.vocab import UNK_ID

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "big", "small", "house", "tree", "runs", "walks"]
WORDS += ["blue", "green", "man", "woman"]


def corpus(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        length = int(torch.randint(1, 9, (1,), generator=gen))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=gen)))
    return lines


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of a random tiny model (max_positions 24, so
    long lines get truncated) with a tiny SentencePiece model."""
    root = tmp_path_factory.mktemp("translate")
    tokenizers = train_tokenizers(TokenizerConfig(vocab_size=40, num_threads=1), root / "tokenizer",
                                  lambda sides: corpus(300))
    config = Config(
        experiment={"dir": str(root / "run")},
        model=ModelConfig(size="tiny", dropout=0.0, max_positions=24),
        decode=DecodeConfig(beam=3, max_len_a=1.0, max_len_b=3, batch_tokens=64),
    )
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    save_checkpoint(root / "run" / "checkpoints", step=1, epoch=0, model=model, config=config, tokenizers=tokenizers,
                    metrics={}, trainer_state={}, best=True, keep_last=1)
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
    from mtkit.checkpoint import load_for_inference

    return load_for_inference(run_dir)


def invoke(args, input=None):
    return CliRunner().invoke(app, args, input=input)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- library


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """The translator's batches: by length, a line over the budget alone."""
    sizes = np.array(lengths)
    return [b.tolist() for b in pack(sizes, np.argsort(sizes, kind="stable"), batch_tokens, oversized="alone")]


def test_token_batches():
    lengths = [5, 1, 3, 9, 2, 2]
    batches = token_batches(lengths, batch_tokens=8)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 8
    assert token_batches([100], 8) == [[0]]


def test_one_line():
    assert one_line("a\nb\rc\u2028d\x0be\x85f") == "a b c d e f"
    assert one_line("tab\tand\x00nul") == "tab\tand\x00nul"


def test_translate_matches_search_and_handles_empty_lines(loaded, backend):
    lines = corpus(12, seed=1)
    lines[3] = ""
    lines[7] = "   "
    translator = make_translator(loaded, backend)
    out = translator.translate(lines)
    assert len(out) == len(lines) and out[3] == "" and out[7] == ""
    one_by_one = [translator.translate([line])[0] for line in lines]
    assert out == one_by_one
    full = translator.translate_lines(lines)
    assert full[3] == Translation("")
    assert all(t.score is not None and t.nbest[0] == (t.text, t.score) for i, t in enumerate(full) if i not in (3, 7))


def test_per_call_nbest_and_beam_are_those_of_a_translator_built_with_them(loaded, backend):
    """Settings that change from call to call (a server's n-best, a wider beam) are arguments of
    the call, not another Translator; the translator's own settings are left as they were."""
    lines = corpus(10, seed=5)
    translator = make_translator(loaded, backend)
    before = translator.translate_lines(lines)
    wider = loaded.config.decode.model_copy(update={"beam": 5, "nbest": 4})
    assert translator.translate_lines(lines, nbest=4, beam=5) == make_translator(loaded, backend,
                                                                                 wider).translate_lines(lines)
    assert max(len(t.nbest) for t in translator.translate_lines(lines, nbest=4, beam=5)) == 4
    assert translator.translate_lines(lines) == before


def test_open_translator_gives_a_library_user_what_mtkit_translate_gives(run_dir):
    """``open_translator(RUN)`` picks the checkpoint, settings and engine as ``mtkit translate -m RUN``."""
    from mtkit.engines import open_translator

    lines = corpus(8, seed=6)
    cli = CliRunner().invoke(app, ["translate", "-m", str(run_dir)], input="".join(line + "\n" for line in lines))
    assert cli.exit_code == 0, cli.output
    with open_translator(run_dir) as translator:
        assert translator.translate(lines) == cli.stdout.splitlines()


def test_input_is_normalised_as_prepare_normalises(loaded):
    """Training saw text after ``mtkit.corpus.normalize``; so does translation, whatever the
    tokenizer's own normalisation rule does with tabs, odd spaces and control characters."""
    translator = Translator(loaded.model, loaded.tokenizers, loaded.config.decode)
    clean = translator.translate(["the red cat", "a dog"])
    assert translator.translate([" the\tred\u00a0 cat\x00 ", "a\u3000dog\ufeff"]) == clean
    assert translator.translate(["\x00\x1b", "\t"]) == ["", ""]


def test_stream_in_chunks_equals_whole(loaded, backend):
    lines = corpus(25, seed=2)
    translator = make_translator(loaded, backend)
    chunks = list(translator.translate_stream(iter(lines), chunk_lines=4))
    assert [len(c) for c in chunks] == [4] * 6 + [1]
    assert [t.text for c in chunks for t in c] == translator.translate(lines)


def test_stream_cut_where_the_input_pauses(loaded, backend):
    lines = corpus(12, seed=9)
    translator = make_translator(loaded, backend)
    paused = list(translator.translate_stream(lines, chunk_lines=5, ready=lambda: False))
    assert [len(c) for c in paused] == [1] * 12
    steady = list(translator.translate_stream(lines, chunk_lines=5, ready=lambda: True))
    assert [len(c) for c in steady] == [5, 5, 2]
    assert [t.text for c in paused for t in c] == [t.text for c in steady for t in c] == translator.translate(lines)


def test_long_line_is_split_or_truncated_with_warning(loaded, backend):
    warnings = []
    translator = make_translator(loaded, backend, warn=warnings.append)
    long = " ".join(WORDS * 3)
    out = translator.translate_lines(["the cat", long])
    assert len(out) == 2 and out[1].pieces >= 2 and translator.split_lines == 1
    assert len(warnings) == 1 and warnings[0].startswith("line 2: ") and "pieces cut at sentence" in warnings[0]
    warnings.clear()
    decode = loaded.config.decode.model_copy(update={"long_lines": "truncate"})
    out = make_translator(loaded, backend, decode, warn=warnings.append).translate_lines(["the cat", long])
    assert len(out) == 2 and out[1].pieces == 1
    assert len(warnings) == 1 and warnings[0].startswith("line 2: ") and "truncated to 23" in warnings[0]


def test_prefix(loaded, backend):
    decode = loaded.config.decode.model_copy(update={"max_len_b": 8})
    translator = make_translator(loaded, backend, decode)
    out = translator.translate_lines(["the cat sat", "a dog"], prefixes=["red house", ""])
    assert out[0].text.startswith("red house")


def test_sampling_is_seeded(loaded, backend):
    decode = loaded.config.decode.model_copy(update={"sampling": True, "nbest": 2})
    lines = corpus(6, seed=3)

    def run(seed):
        return [t.nbest for t in make_translator(loaded, backend, decode, seed=seed).translate_lines(lines)]

    assert run(5) == run(5)
    assert all(len(n) == 2 for n in run(5))


def test_resolve_decode_order(tmp_path):
    stored = DecodeConfig(beam=3, lenpen=0.5, max_len_b=7)
    config = tmp_path / "c.yaml"
    config.write_text("decode:\n  beam: 8\n  min_len: 2\nmodel:\n  size: tiny\n")
    decode = resolve_decode(stored, config, ["decode.min_len=4", "decode.nbest=2"], {"beam": 6, "lenpen": None})
    assert (decode.beam, decode.lenpen, decode.max_len_b, decode.min_len, decode.nbest) == (6, 0.5, 7, 4, 2)


# --------------------------------------------------------------------------- CLI


def test_cli_file_to_stdout_equals_library(run_dir, loaded, tmp_path, backend):
    lines = corpus(15, seed=4)
    src = write(tmp_path / "in.txt", lines)
    result = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--backend", backend])
    assert result.exit_code == 0, result.output
    expected = make_translator(loaded, backend).translate(lines)
    assert result.stdout.split("\n")[:-1] == expected


def test_cli_line_alignment_on_awkward_input(run_dir, tmp_path, backend):
    raw = (b"the cat\n\nred dog\r\n\xff\xfe bad bytes\n"
           b"nul\x00inside\n" + "line\u2028sep and \x0b tab".encode() + b"\n" + b"a\rb\n" + b"last no newline")
    result = CliRunner().invoke(app, ["translate", "-m", str(run_dir), "--backend", backend], input=raw)
    assert result.exit_code == 0, result.output
    out = result.stdout_bytes.split(b"\n")
    assert len(out) == 9 and out[-1] == b""  # 8 inputs, 8 lines
    assert out[1] == b""
    assert "<stdin>:4: invalid UTF-8" in result.stderr and "Traceback" not in result.stderr
    crlf = invoke(["translate", "-m", str(run_dir), "--backend", backend], input=b"the cat\r\nred dog\r\n")
    lf = invoke(["translate", "-m", str(run_dir), "--backend", backend], input=b"the cat\nred dog\n")
    assert crlf.stdout == lf.stdout


def test_cli_long_line_warns_and_keeps_line(run_dir, backend):
    text = "the cat\n" + " ".join(WORDS * 3) + "\nred dog\n"
    result = invoke(["translate", "-m", str(run_dir), "--backend", backend], input=text)
    assert result.exit_code == 0
    assert len(result.stdout.split("\n")) == 4
    assert "mtkit: warning: line 2:" in result.stderr


def test_cli_output_file_jsonl_nbest(run_dir, tmp_path, backend):
    src = write(tmp_path / "in.txt", ["the cat", "", "a big dog runs"])
    out = tmp_path / "sub" / "out.jsonl"
    result = invoke(["translate", "-m", str(run_dir), "-i", str(src), "-o", str(out), "--nbest", "2", "--output-format",
                     "jsonl", "--beam", "4", "--backend", backend])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and result.stdout == ""
    assert records[1] == {"translation": "", "score": None, "nbest": []}
    assert len(records[0]["nbest"]) == 2 and records[0]["nbest"][0]["translation"] == records[0]["translation"]
    assert records[0]["nbest"][0]["score"] >= records[0]["nbest"][1]["score"]
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temporary left
    into_dir = invoke(["translate", "-m", str(run_dir), "-i", str(src), "-o", str(out.parent), "--backend", backend])
    assert into_dir.exit_code == 1 and into_dir.stderr.startswith(f"mtkit: error: {out.parent}: cannot write")
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]


def test_cli_options_and_errors(run_dir, tmp_path, backend):
    src = write(tmp_path / "in.txt", corpus(5, seed=5))
    base = ["translate", "-m", str(run_dir), "-i", str(src), "--backend", backend]
    greedy = invoke(base + ["--beam", "1"])
    assert greedy.exit_code == 0
    assert invoke(base + ["--set", "decode.beam=1"]).stdout == greedy.stdout
    assert invoke(base + ["--nbest", "2"]).exit_code != 0
    bad = invoke(base + ["--set", "train.lr=1"])
    assert bad.exit_code != 0 and "decode" in bad.stderr
    typo = invoke(base + ["--set", "decode.beem=1"])
    assert typo.exit_code == 2 and "decode.beem: unknown key (did you mean 'beam'?)" in typo.stderr
    sampled = [invoke(base + ["--sampling", "--seed", "3", "--top-k", "5"]).stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0].split("\n")) == 6
    assert invoke(base + ["--device", "tpu"]).exit_code == 1


def test_cli_ref_prints_scores_on_stderr(run_dir, tmp_path):
    lines = corpus(5, seed=6)
    src, ref = write(tmp_path / "in.txt", lines), write(tmp_path / "ref.txt", lines)
    result = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--ref", str(ref)])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 5
    assert "BLEU|nrefs:1" in result.stderr and "chrF2|" in result.stderr and "TER|" in result.stderr
    short = write(tmp_path / "short.txt", lines[:2])
    mismatch = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--ref", str(short)])
    assert mismatch.exit_code == 1 and f"{short}: 2 lines but the input has 5" in mismatch.stderr
    missing = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--ref", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "file not found" in missing.stderr


def test_cli_prefix_file(run_dir, tmp_path, backend):
    src = write(tmp_path / "in.txt", ["the cat", "a dog"])
    prefix = write(tmp_path / "prefix.txt", ["red house", ""])
    result = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--prefix", str(prefix), "--max-len-b", "8",
                     "--backend", backend])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("red house")
    short = write(tmp_path / "short.txt", ["red"])
    few = invoke(["translate", "-m", str(run_dir), "-i", str(src), "--prefix", str(short), "--backend", backend])
    assert few.exit_code == 1 and few.stderr.startswith("mtkit: error: prefixes: fewer lines than the input")
    many = invoke(["translate", "-m", str(run_dir), "-i", str(short), "--prefix", str(prefix), "--backend", backend])
    assert many.exit_code == 1 and "more lines than the input" in many.stderr


def test_cli_never_outputs_unk_unless_allowed(loaded, tmp_path, backend):
    """A model that puts almost all its mass on UNK at every step: by default the translation
    holds no `` ⁇ ``; with ``decode.allow_unk=true`` it does."""
    config = loaded.config.model_copy(update={"model": ModelConfig(size="tiny", dropout=0.0, tie_output=False)})
    model = Transformer(config.model, loaded.tokenizers.src.vocab_size, loaded.tokenizers.tgt.vocab_size)
    with torch.no_grad():  # the decoder's output is all ones whatever the input; only UNK's row sees it
        model.decoder_layer_norm.weight.zero_()
        model.decoder_layer_norm.bias.fill_(1.0)
        model.output_proj.weight.zero_()
        model.output_proj.weight[UNK_ID] = 1.0
    save_checkpoint(tmp_path / "unk" / "checkpoints", step=1, epoch=0, model=model, config=config,
                    tokenizers=loaded.tokenizers, metrics={}, trainer_state={}, best=True, keep_last=1)
    src = write(tmp_path / "in.txt", corpus(6, seed=7))
    for options in ([], ["--beam", "1"], ["--sampling", "--seed", "2"]):
        default = invoke(["translate", "-m", str(tmp_path / "unk"), "-i", str(src), "--backend", backend, *options])
        assert default.exit_code == 0, default.output
        assert len(default.stdout.splitlines()) == 6 and "\u2047" not in default.stdout
        allowed = invoke(["translate", "-m", str(tmp_path / "unk"), "-i", str(src), "--set", "decode.allow_unk=true",
                          "--backend", backend, *options])
        assert allowed.exit_code == 0 and "\u2047" in allowed.stdout


def test_cli_bad_checkpoints_give_one_line_errors(run_dir, tmp_path):
    import shutil

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"hello": 1}')
    truncated = tmp_path / "truncated"
    shutil.copytree((run_dir / "checkpoints" / "best").resolve(), truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "out.txt"
    for path in (tmp_path / "missing", foreign, truncated, tmp_path):
        result = invoke(["translate", "-m", str(path), "-o", str(out)], input="the cat\n")
        assert result.exit_code == 1, path
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mtkit: error: "), result.stderr
    assert not out.exists()


def test_cli_stops_quietly_when_the_reader_goes_away(run_dir, tmp_path, backend):
    src = write(tmp_path / "in.txt", corpus(400, seed=7))
    translate = (f"{sys.executable} -m mtkit translate -m {run_dir} -i {src} --chunk-lines 20 --beam 1 --threads 1"
                 f" --backend {backend}")
    command = f"{translate} | head -n 3"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 3
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def read_line_within(stream, seconds: float) -> bytes:
    """One line from a pipe, or what arrived when ``seconds`` ran out (bounded, never blocks)."""
    import os
    import select
    import time

    data, deadline = b"", time.monotonic() + seconds
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            break
        chunk = os.read(stream.fileno(), 1)  # byte by byte: nothing of the next line is taken
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("terminal", [False, True])
def test_cli_translates_each_line_as_it_arrives(run_dir, loaded, terminal, backend):
    """Lines written one at a time to a pipe (or typed at a terminal) are translated and written
    before the next one is written and before the input ends."""
    import os
    import pty

    lines = ["the cat sat on the mat", "a big dog runs", "", "red tree"]
    expected = make_translator(loaded, backend).translate(lines)
    command = [sys.executable, "-m", "mtkit", "translate", "-m", str(run_dir), "--threads", "1",
               "--flush-wait", "0.1", "--backend", backend]
    if terminal:
        writer, stdin = pty.openpty()  # stdin a terminal: no wait at all
    else:
        stdin, writer = os.pipe()
    proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(stdin)
    try:
        for line, translation in zip(lines, expected, strict=True):
            os.write(writer, line.encode() + b"\n")
            assert read_line_within(proc.stdout, 60) == translation.encode() + b"\n"
        assert proc.poll() is None  # still waiting for input
        if terminal:
            os.write(writer, b"\x04")  # Ctrl-D (closing a terminal hangs it up: an I/O error)
        else:
            os.close(writer)
            writer = -1
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert proc.stdout.read() == b"" and proc.stderr.read() == b""
    finally:
        if writer >= 0:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_fast_pipe_equals_file(run_dir, tmp_path, backend):
    src = write(tmp_path / "in.txt", corpus(60, seed=10) + ["", "red dog"])
    base = [sys.executable, "-m", "mtkit", "translate", "-m", str(run_dir), "--threads", "1", "--backend", backend]
    from_file = subprocess.run([*base, "-i", str(src)], capture_output=True, timeout=120)
    piped = subprocess.run(["bash", "-c", f"cat {src} | {' '.join(base)}"], capture_output=True, timeout=120)
    assert from_file.returncode == piped.returncode == 0
    assert piped.stdout == from_file.stdout and from_file.stdout.count(b"\n") == 62


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run_dir, tmp_path):
    src = write(tmp_path / "in.txt", corpus(30, seed=8) + ["", " ".join(WORDS * 3)])
    args = ["-m", str(run_dir), "-i", str(src), "--chunk-lines", "7", "--threads", "1"]
    single = invoke(["translate", *args])
    out = tmp_path / "out.txt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mtkit", "translate", *args,
         "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == single.stdout
    assert "line 32: " in done.stderr  # warnings keep the input's line numbers

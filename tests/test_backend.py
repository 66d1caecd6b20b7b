"""The search backends (mtkit.engines): what ``auto`` picks and says, the CTranslate2 conversion
made on first use (reused, rebuilt when stale, written atomically, elsewhere when the checkpoint
is read-only), ``compute_type: auto``'s stored measurement, the length-penalty forms, and the
settings both backends must honour alike. The tests that translate text the same way with
either backend are parametrized in test_translate.py, test_hostile.py and test_serve.py."""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers.backends import make_translator, needs_ct2
from typer.testing import CliRunner

from mtkit.checkpoint import load_for_inference, save_checkpoint
from mtkit.cli import app
from mtkit.config import Config, DecodeConfig, EvalCorpusConfig, ModelConfig, TokenizerConfig
from mtkit.engines import ctranslate2 as ct2engine
from mtkit.engines import open_engine
from mtkit.engines.precision import RECORD, TORCH_RECORD
from mtkit.engines.pytorch import DTYPES, TorchBackend
from mtkit.errors import MtkitError
from mtkit.models.encoder_decoder import Transformer
from mtkit.tokenizer import train_tokenizers

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "big", "small", "house", "tree", "runs", "walks"]
WORDS += ["blue", "green", "man", "woman"]


def corpus(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(1, 9, (1,),
                                                                                             generator=gen)),),
                                                               generator=gen)) for _ in range(n)]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A random tiny model whose config names a 30-line validation set (text files)."""
    root = tmp_path_factory.mktemp("backend")
    tokenizers = train_tokenizers(TokenizerConfig(vocab_size=40, num_threads=1), root / "tokenizer",
                                  lambda sides: corpus(300, seed=0))
    valid = {"src": str(write(root / "valid.src", corpus(30, seed=1))),
             "tgt": str(write(root / "valid.tgt", corpus(30, seed=2)))}
    config = Config(
        experiment={"dir": str(root / "run")},
        data={"valid": valid},
        model=ModelConfig(size="tiny", dropout=0.0, max_positions=24),
        decode=DecodeConfig(beam=3, max_len_a=1.0, max_len_b=3, batch_tokens=64),
    )
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    save_checkpoint(root / "run" / "checkpoints", step=1, epoch=0, model=model, config=config, tokenizers=tokenizers,
                    metrics={}, trainer_state={}, best=True, keep_last=1)
    return root / "run"


@pytest.fixture
def checkpoint(run_dir, tmp_path) -> Path:
    """A fresh copy of the checkpoint directory (no conversion or compute-type record in it yet)."""
    import shutil

    source = (run_dir / "checkpoints" / "best").resolve()
    ignore = shutil.ignore_patterns("ctranslate2-*", "torch_compute_type.json")
    return Path(shutil.copytree(source, tmp_path / "ckpt", ignore=ignore))


def user_valid(run_dir: Path) -> dict[str, str]:
    """The fixture's validation files, as a user names them (``-c CONFIG``'s ``data.valid``):
    the compute-type check never reads the one a checkpoint's own config names."""
    return {side: str(run_dir.parent / f"valid.{side}") for side in ("src", "tgt")}


def invoke(args, input=None):
    return CliRunner().invoke(app, args, input=input)


def conversions(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((ct2engine.CT2_PREFIX, ".")))


# --------------------------------------------------------------------------- auto, conversion, compute type


@needs_ct2
def test_auto_converts_once_measures_int8_once_and_says_so(checkpoint, run_dir, tmp_path):
    """The first translation says that it measures before it does, then the choice in one line;
    int8 is kept only if it holds BLEU and is faster; later translations say the choice only."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(json.dumps({"data": {"valid": user_valid(run_dir)}}))  # JSON is YAML
    first = invoke(["translate", "-m", str(checkpoint), "-c", str(mine)], input="the cat\n\nred dog\n")
    assert first.exit_code == 0, first.output
    assert first.stdout.count("\n") == 3
    announced, said = first.stderr.splitlines()[:-1], first.stderr.splitlines()[-1:]
    assert len(announced) == 1 and announced[0].startswith("mtkit: compute type: checking int8 against float32 on "
                                                           "30 sentences of data.valid"), first.stderr
    assert len(said) == 1 and said[0].startswith("mtkit: backend: ctranslate2 "), first.stderr
    assert "on 30 validation sentences, measured now" in said[0]
    [name] = conversions(checkpoint)
    converted = checkpoint / name
    assert (converted / "model.bin").is_file()
    record = json.loads((converted / RECORD).read_text())["cpu"]
    assert record["sentences"] == 30 and set(record["bleu"]) == {"float32", "int8"}
    seconds = record["seconds"]
    kept = record["bleu"]["int8"] >= record["bleu"]["float32"] - 0.3 and seconds["int8"] < seconds["float32"]
    expected = "int8" if kept else "float32"
    assert record["choice"] == expected and f"ctranslate2 {expected} on cpu" in said[0]

    stamp = (converted / "model.bin").stat().st_mtime_ns
    again = invoke(["translate", "-m", str(checkpoint)], input="the cat\n\nred dog\n")
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert "measured before" in again.stderr and len(again.stderr.splitlines()) == 1
    assert conversions(checkpoint) == [name] and (converted / "model.bin").stat().st_mtime_ns == stamp


@needs_ct2
def test_a_stale_conversion_is_replaced(checkpoint, monkeypatch):
    loaded = load_for_inference(checkpoint)
    old = ct2engine.ct2_model_dir(loaded, warn=pytest.fail)
    monkeypatch.setattr(ct2engine, "_CT2_CONVERTER_VERSION", 999)  # as after an upgrade of the converter
    new = ct2engine.ct2_model_dir(loaded, warn=pytest.fail)
    assert new != old and conversions(checkpoint) == [new.name]


@needs_ct2
def test_a_read_only_checkpoint_converts_into_the_cache_then_falls_back_to_torch(checkpoint, tmp_path, monkeypatch):
    real = ct2engine._convert_into
    refused: set[Path] = {checkpoint.resolve()}

    def convert(loaded, target):
        if target.parent in refused:
            raise PermissionError(13, "Permission denied")
        real(loaded, target)

    monkeypatch.setattr(ct2engine, "_convert_into", convert)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    loaded = load_for_inference(checkpoint)
    warnings: list[str] = []
    cached = ct2engine.ct2_model_dir(loaded, warn=warnings.append)
    assert cached.is_relative_to(tmp_path / "cache" / "mtkit") and (cached / "model.bin").is_file()
    assert len(warnings) == 1 and "not writable" in warnings[0] and str(cached) in warnings[0]
    assert conversions(checkpoint) == []

    refused.add(cached.parent)
    import shutil

    shutil.rmtree(cached)
    said: list[str] = []
    auto = open_engine(loaded, loaded.config.decode, say=said.append, warn=warnings.append)
    assert isinstance(auto, TorchBackend) and len(said) == 1
    assert re.fullmatch(r"backend: torch (float32|bfloat16) on cpu \(no place to store the CTranslate2 model; .*\)",
                        said[0])
    assert "translating with PyTorch" in warnings[-1]
    explicit = loaded.config.decode.model_copy(update={"backend": "ctranslate2"})
    with pytest.raises(MtkitError, match="cannot store the CTranslate2 model"):
        open_engine(loaded, explicit, say=said.append, warn=warnings.append)


@needs_ct2
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a POSIX user that permissions bind")
def test_a_really_read_only_checkpoint_uses_the_cache(checkpoint, tmp_path):
    checkpoint.chmod(0o555)
    try:
        result = subprocess.run([sys.executable, "-m", "mtkit", "translate", "-m", str(checkpoint)], input="the cat\n",
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    finally:
        checkpoint.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stderr and conversions(checkpoint) == []


@needs_ct2
def test_two_conversions_at_once_leave_one_complete_model(checkpoint, monkeypatch):
    barrier = threading.Barrier(2, timeout=60)
    real_write = ct2engine.CTranslate2Exporter.write

    def write_then_wait(self, loaded, directory):
        real_write(self, loaded, directory)
        barrier.wait()  # both have written their copy before either renames it into place

    monkeypatch.setattr(ct2engine.CTranslate2Exporter, "write", write_then_wait)
    loaded = load_for_inference(checkpoint)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ct2engine.ct2_model_dir(loaded, warn=pytest.fail)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2 and results[0] == results[1]
    assert conversions(checkpoint) == [results[0].name]  # no temporary directory left
    assert make_translator(loaded, "ctranslate2").translate(["the cat"])  # and it loads


# --------------------------------------------------------------------------- what CTranslate2 cannot honour


@needs_ct2
def test_gnmt_length_penalty_keeps_auto_on_torch_and_refuses_explicit_ctranslate2(run_dir):
    base = ["translate", "-m", str(run_dir), "--length-penalty-form", "gnmt"]
    auto = invoke(base, input="the cat\n")
    assert auto.exit_code == 0
    assert re.fullmatch(r"mtkit: backend: torch \w+ on cpu \(decode\.length_penalty_form=gnmt: CTranslate2 divides "
                        r"by length \*\* lenpen only \(set decode\.length_penalty_form=length\); [^\n]+\)\n",
                        auto.stderr)
    explicit = invoke([*base, "--backend", "ctranslate2"], input="the cat\n")
    assert explicit.exit_code == 1
    assert explicit.stderr.startswith("mtkit: error: decode.backend=ctranslate2: decode.length_penalty_form=gnmt")
    assert len(explicit.stderr.splitlines()) == 1
    unpenalised = invoke([*base, "--lenpen", "0", "--backend", "ctranslate2"], input="the cat\n")
    assert unpenalised.exit_code == 0, unpenalised.stderr
    unsupported = invoke(["translate", "-m", str(run_dir), "--backend", "ctranslate2", "--compute-type", "float16"],
                         input="the cat\n")
    assert unsupported.exit_code == 1 and "decode.compute_type=float16: not supported on this cpu" in unsupported.stderr


def test_mtkit_translates_without_ctranslate2(run_dir, tmp_path):
    blocker = tmp_path / "blocker" / "ctranslate2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("simulated: no ctranslate2")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "mtkit", "translate", "-m", str(run_dir), "--threads", "1"]
    auto = subprocess.run(command, input="the cat\n", capture_output=True, text=True, timeout=120, env=env)
    assert auto.returncode == 0 and auto.stdout.count("\n") == 1
    assert re.fullmatch(r"mtkit: backend: torch \w+ on cpu \(ctranslate2 is not installed \(pip install "
                        r"ctranslate2\); [^\n]+\)\n", auto.stderr)
    explicit = subprocess.run([*command, "--backend", "ctranslate2"], input="the cat\n", capture_output=True,
                              text=True, timeout=120, env=env)
    assert explicit.returncode == 1
    assert explicit.stderr == ("mtkit: error: decode.backend=ctranslate2: ctranslate2 is not installed "
                               "(pip install ctranslate2)\n")


# --------------------------------------------------------------------------- the settings mean the same


def test_length_penalty_forms_score_the_same_tokens_by_their_formula(run_dir):
    loaded = load_for_inference(run_dir)
    src = loaded.tokenizers.src.encode(corpus(8, seed=3))
    greedy = loaded.config.decode.model_copy(update={"beam": 1, "lenpen": 0.7})
    found = {}
    for form in ("length", "gnmt"):
        decode = greedy.model_copy(update={"length_penalty_form": form})
        found[form] = [hyps[0] for hyps in make_translator(loaded, "torch", decode).search(src)]
    for by_length, by_gnmt in zip(found["length"], found["gnmt"], strict=True):
        assert by_length.tokens == by_gnmt.tokens
        length = len(by_length.tokens) + 1  # with the EOS
        assert by_length.score * length**0.7 == pytest.approx(by_gnmt.score * ((5 + length) / 6) ** 0.7, rel=1e-5)


@needs_ct2
@pytest.mark.parametrize("settings", [
    {"beam": 1},
    {"beam": 1, "min_len": 4},
    {"beam": 1, "max_len_a": 0.5, "max_len_b": 1},
    {"beam": 3},
    {"beam": 4, "lenpen": 0.6, "max_len_a": 0.5, "max_len_b": 1},
])
def test_search_gives_the_same_text_with_either_backend(run_dir, settings):
    """Lines of many lengths in one batch: each keeps its own maximum length."""
    loaded = load_for_inference(run_dir)
    decode = loaded.config.decode.model_copy(update={**settings, "compute_type": "float32"})
    lines = corpus(20, seed=4) + ["", " ".join(WORDS)]
    prefixes = ["red"] * 5 + [""] * 17
    torch_out = make_translator(loaded, "torch", decode).translate_lines(lines, prefixes)
    ct2_out = make_translator(loaded, "ctranslate2", decode).translate_lines(lines, prefixes)
    assert [t.text for t in ct2_out] == [t.text for t in torch_out]
    for ours, theirs in zip(torch_out, ct2_out, strict=True):
        lengths = {len(loaded.tokenizers.tgt.encode([t.text])[0]) for t in (ours, theirs)}
        assert len(lengths) == 1


@needs_ct2
def test_prefix_tokens_count_in_the_score_with_either_backend(run_dir):
    loaded = load_for_inference(run_dir)
    decode = loaded.config.decode.model_copy(update={"beam": 1, "lenpen": 0.0, "compute_type": "float32"})
    plain = make_translator(loaded, "torch", decode).translate_lines(["the cat sat"], ["red house"])[0]
    ct2 = make_translator(loaded, "ctranslate2", decode).translate_lines(["the cat sat"], ["red house"])[0]
    assert ct2.text == plain.text and ct2.text.startswith("red house")
    # The same tokens, scored alike: CTranslate2's score lacks the prefix's tokens (and here,
    # at the maximum length, the EOS); the backend scores them again, whole.
    assert ct2.score == pytest.approx(plain.score, rel=1e-4)


@needs_ct2
def test_nbest_scores_of_hypotheses_cut_at_the_limit_are_mtkits_with_either_backend(run_dir):
    """Every hypothesis reaches the maximum length: CTranslate2's scores lack the EOS that mtkit
    forces there, and those that may still rank are scored again; the n best are mtkit's."""
    loaded = load_for_inference(run_dir)
    decode = loaded.config.decode.model_copy(update={"beam": 4, "nbest": 2, "lenpen": 0.6, "max_len_a": 0.0,
                                                     "max_len_b": 2, "compute_type": "float32"})
    lines = corpus(12, seed=5)
    torch_out = make_translator(loaded, "torch", decode).translate_lines(lines, nbest=2)
    ct2_out = make_translator(loaded, "ctranslate2", decode).translate_lines(lines, nbest=2)
    for ours, theirs in zip(torch_out, ct2_out, strict=True):
        assert [text for text, _ in theirs.nbest] == [text for text, _ in ours.nbest]
        assert [score for _, score in theirs.nbest] == pytest.approx([score for _, score in ours.nbest], rel=1e-4)


def test_only_hypotheses_whose_bound_beats_the_nth_best_exact_score_are_scored_again():
    worth = ct2engine.CT2Translator._worth_scoring
    scores = [[-1.0, -2.0, -1.5], [-3.0, -0.5], [-1.0, -2.0]]
    inexact = [(0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]  # sentence 2: none exact
    assert worth(scores, inexact, nbest=1) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert worth(scores, [(0, 2)], nbest=2) == [(0, 2)]  # the 2nd best exact is -2.0
    assert worth(scores, [(0, 2)], nbest=1) == []  # below the best exact, -1.0


def reference_length_form_beam(model, src_row, *, beam, lenpen, max_len, nbest):
    """Beam search under length ** lenpen for one sentence, with lists and full recomputation:
    the finishing rule of mtkit.search, ended once ``beam`` hypotheses have finished."""
    from mtkit.search import length_penalty
    from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

    vocab = model.output_proj.out_features
    live, finished, count = [([], 0.0)], [], 0
    for step in range(max_len + 1):
        cands = []
        for toks, score in live:
            with torch.no_grad():
                logits = model(src_row[None], torch.tensor([[BOS_ID] + toks]))[0, -1]
            lp = torch.log_softmax(logits.float(), dim=-1).tolist()
            cands += [(score + lp[v], toks, v) for v in range(vocab)
                      if v not in (PAD_ID, BOS_ID) and (v == EOS_ID or step < max_len) and (v != EOS_ID or step >= 1)]
        cands = sorted(cands, key=lambda c: -c[0])[: 2 * beam]
        for rank, (score, toks, v) in enumerate(cands):
            if v == EOS_ID and rank < beam:
                finished.append((toks, score / length_penalty(step + 1, lenpen, "length")))
                count += 1
        finished = sorted(finished, key=lambda f: -f[1])[:nbest]
        live = [(toks + [v], score) for score, toks, v in cands if v != EOS_ID][:beam]
        if not live or count >= beam:
            break
    return finished


@pytest.mark.parametrize(("beam", "lenpen", "nbest"), [(3, 1.0, 1), (4, 0.6, 3)])
def test_length_form_beam_search_ends_once_beam_hypotheses_have_finished(beam, lenpen, nbest):
    from helpers.search import SOURCES, make_src
    from test_search import make_model

    from mtkit.search import beam_search

    model = make_model(30, seed=0, eos_bias=1.0)  # one where searching on to the bound finds other outputs
    src = make_src(SOURCES)
    out = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=1.0, max_len_b=3, min_len=1, nbest=nbest,
                      lenpen_form="length")
    for row, source in enumerate(SOURCES):
        expected = reference_length_form_beam(model, src[row], beam=beam, lenpen=lenpen, max_len=len(source) + 1 + 3,
                                              nbest=nbest)
        assert [h.tokens for h in out[row]] == [e[0] for e in expected]
        assert [h.score for h in out[row]] == pytest.approx([e[1] for e in expected], abs=1e-4)


# --------------------------------------------------------------------------- the PyTorch backend


def torch_decode(loaded, compute_type: str = "float32") -> DecodeConfig:
    return loaded.config.decode.model_copy(update={"backend": "torch", "compute_type": compute_type})


def test_torch_worker_processes_translate_as_this_process_does(checkpoint):
    """Batches searched by two forked worker processes come back in order and equal to the
    search in this process; sampling stays in this process (one seeded stream)."""
    loaded = load_for_inference(checkpoint)
    sources = [ids for ids in loaded.tokenizers.src.encode(corpus(40, seed=3)) if ids]
    batches = [sources[i : i + 5] for i in range(0, len(sources), 5)]
    decode = torch_decode(loaded)
    alone = open_engine(loaded, decode, workers=1, say=print, warn=print)
    workers = open_engine(loaded, decode, workers=2, say=print, warn=print)
    try:
        assert workers.search(batches, None, decode) == alone.search(batches, None, decode)
        assert workers._pool is not None and alone._pool is None
        sampling = decode.model_copy(update={"sampling": True})
        first = open_engine(loaded, sampling, workers=2, seed=4, say=print, warn=print)
        again = open_engine(loaded, sampling, workers=2, seed=4, say=print, warn=print)
        assert first.search(batches, None, sampling) == again.search(batches, None, sampling)
        assert first._pool is None
    finally:
        workers.close()


def test_a_dead_torch_worker_is_a_clear_error(checkpoint, monkeypatch):
    import mtkit.engines.pytorch

    loaded = load_for_inference(checkpoint)
    sources = [ids for ids in loaded.tokenizers.src.encode(corpus(20, seed=3)) if ids]
    # Forked after the patch, the workers die on their first batch.
    monkeypatch.setattr(mtkit.engines.pytorch.TorchBackend, "search_batch", lambda *args: os._exit(9))
    backend = open_engine(loaded, torch_decode(loaded), workers=2, say=print, warn=print)
    with pytest.raises(MtkitError, match="a PyTorch worker process died"):
        backend.search([sources[:10], sources[10:]], None, torch_decode(loaded))
    backend.close()


def test_torch_compute_type(checkpoint, run_dir, monkeypatch):
    """Explicit bfloat16 runs the weights in bf16; auto checks bf16 on the validation set once
    where the CPU multiplies it in hardware (and stores why), else stays float32; CTranslate2's
    own types are refused in one line."""
    import mtkit.runtime

    loaded = load_for_inference(checkpoint)
    assert open_engine(loaded, torch_decode(loaded, "bfloat16"), say=print, warn=print).dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.float32  # converted on a copy
    with pytest.raises(MtkitError, match=r"^decode.compute_type=int8: the PyTorch backend runs float32, bfloat16, "):
        open_engine(loaded, torch_decode(loaded, "int8"), say=print, warn=print)

    said: list[str] = []
    # auto, with a setting CTranslate2 cannot honour: auto comes to PyTorch and says why.
    auto = loaded.config.decode.model_copy(update={"compute_type": "auto", "length_penalty_form": "gnmt"})
    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: False)
    assert open_engine(loaded, auto, say=said.append, warn=print).dtype == torch.float32
    assert said[-1].startswith("backend: torch float32 on cpu (") and "bfloat16 is not native here" in said[-1]
    assert not (checkpoint / TORCH_RECORD).exists()

    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: True)
    chosen = open_engine(loaded, auto, valid=EvalCorpusConfig(**user_valid(run_dir)), say=said.append, warn=print)
    record = json.loads((checkpoint / TORCH_RECORD).read_text())["torch cpu"]
    assert set(record["bleu"]) == {"float32", "bfloat16"} and record["sentences"] == 30
    assert chosen.dtype == DTYPES[record["choice"]]
    assert "measured now" in said[-1] and str(checkpoint / TORCH_RECORD) in said[-1]
    open_engine(loaded, auto, say=said.append, warn=print)
    assert "measured before" in said[-1]


def test_auto_keeps_the_faster_of_the_precisions_that_hold_bleu(checkpoint, monkeypatch):
    """bfloat16 that holds BLEU but translates slower than float32 is not kept; a stored
    record's choice is made again from its figures, not obeyed."""
    import mtkit.runtime

    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: True)
    # gnmt: auto comes to PyTorch (CTranslate2 cannot honour it) and says which precision.
    command = ["translate", "-m", str(checkpoint), "--length-penalty-form", "gnmt"]
    record = {"choice": "bfloat16", "bleu": {"float32": 20.0, "bfloat16": 20.0}, "sentences": 30}
    for seconds, expected in (({"float32": 1.0, "bfloat16": 2.3}, "float32"),
                              ({"float32": 2.3, "bfloat16": 1.0}, "bfloat16")):
        (checkpoint / TORCH_RECORD).write_text(json.dumps({"torch cpu": {**record, "seconds": seconds}}))
        result = invoke(command, input="the cat\n")
        assert result.exit_code == 0, result.output
        assert result.stderr.startswith(f"mtkit: backend: torch {expected} on cpu ("), result.stderr
        assert "measured before" in result.stderr


def test_the_precision_check_says_what_it_measures_before_it_starts(checkpoint, run_dir, tmp_path, monkeypatch):
    import mtkit.runtime

    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: True)
    mine = tmp_path / "mine.yaml"
    mine.write_text(json.dumps({"data": {"valid": user_valid(run_dir)}}))  # JSON is YAML
    result = invoke(["translate", "-m", str(checkpoint), "-c", str(mine), "--length-penalty-form", "gnmt"],
                    input="the cat\n")
    assert result.exit_code == 0, result.output
    said = result.stderr.splitlines()
    assert len(said) == 2, result.stderr
    assert said[0] == (f"mtkit: compute type: checking bfloat16 against float32 on 30 sentences of data.valid "
                       f"(once; stored in {checkpoint / TORCH_RECORD})")
    assert said[1].startswith("mtkit: backend: torch ") and "measured now" in said[1]


def test_translate_threads_fork_torch_workers_through_the_cli(run_dir, tmp_path):
    """`mtkit translate --threads 2` with the PyTorch backend: the same lines as one thread."""
    source = write(tmp_path / "in.txt", corpus(60, seed=5) + ["", "the cat"])
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}.txt"
        result = invoke(["translate", "-m", str(run_dir), "--backend", "torch", "--compute-type", "float32",
                         "--threads", threads, "--batch-tokens", "16", "-i", str(source), "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == 62

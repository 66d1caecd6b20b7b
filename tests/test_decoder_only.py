"""The decoder-only architecture (``model.arch: decoder_only``): masks, positions, the
key/value cache, search through the shared interface, training through the CLI (loss falls,
resume is bit-exact), translation of hostile text, CTranslate2 export and its refusals."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers.data import copy_experiment
from helpers.search import SOURCES, favour_eos, make_src
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import mtkit.train
from mtkit.checkpoint import load_for_inference
from mtkit.cli import app
from mtkit.config import ModelConfig, load_config
from mtkit.errors import ConfigError, MtkitError
from mtkit.export import CTranslate2Exporter, HuggingFaceExporter, export
from mtkit.models import build_model
from mtkit.models.decoder_only import DecoderOnly
from mtkit.search import beam_search, greedy_search, sample
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

VARIANTS = ["bidirectional", "causal"]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(arch="decoder_only", size="tiny_decoder_only", dropout=0.0, **overrides)


def make_model(vocab: int = 30, seed: int = 0, eos_bias: float = 2.0, **overrides) -> DecoderOnly:
    """A random tiny model whose output favours EOS a little (``favour_eos``)."""
    torch.manual_seed(seed)
    model = DecoderOnly(tiny(tie_output=False, **overrides), vocab, vocab)
    favour_eos(model, vocab, eos_bias)
    return model


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = make_src([torch.randint(4, 30, (6,), generator=gen).tolist(), [7, 8, 9]])
    tgt = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 30, (2, 5), generator=gen)], dim=1)
    return src, tgt


# --------------------------------------------------------------------------- config and sizes


def test_presets_match_small_in_parameters_and_layers():
    def body(model: nn.Module) -> int:  # everything but the embeddings and the output layer
        return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "output_proj" not in n)

    small = body(build_model(ModelConfig(size="small"), 8000, 8000))
    matched = body(build_model(ModelConfig(arch="decoder_only", size="small_decoder_only"), 8000, 8000))
    layers = build_model(ModelConfig(arch="decoder_only", size="small_decoder_only_layers"), 8000, 8000)
    assert abs(matched - small) / small < 0.001
    assert isinstance(layers, DecoderOnly) and len(layers.layers) == 6


def test_config_refusals_are_one_line():
    with pytest.raises(ConfigError, match="decoder_only has no encoder"):
        load_config(None, ["model.arch=decoder_only"])
    with pytest.raises(ConfigError, match="source_loss_weight > 0 needs model.arch decoder_only"):
        load_config(None, ["model.arch=decoder_only", "model.size=tiny_decoder_only", "train.source_loss_weight=1"])
    config = load_config(None, ["model.arch=decoder_only", "model.size=tiny_decoder_only",
                                "model.source_attention=causal", "train.source_loss_weight=0.5"])
    assert config.model.encoder_layers == 0 and config.model.decoder_layers == 5
    assert load_config(None).model.arch == "encoder_decoder"  # the default, as old checkpoints were


# --------------------------------------------------------------------------- masks and positions


def test_prefix_lm_masks():
    model = make_model(source_attention="bidirectional")
    src, tgt = pair()
    with torch.no_grad():
        sequence = model.sequence_features(src, tgt)
        later_target = tgt.clone()
        later_target[:, 3] = 11
        changed = model.sequence_features(src, later_target)
        torch.testing.assert_close(changed[:, : src.shape[1] + 3], sequence[:, : src.shape[1] + 3])
        assert not torch.allclose(changed[:, src.shape[1] + 3], sequence[:, src.shape[1] + 3])
        for column in (0, 3):  # any source token reaches every position, earlier source ones too
            other = src.clone()
            other[0, column] = 13 if src[0, column] != 13 else 14
            moved = model.sequence_features(other, tgt)[0, :7]  # row 0's real tokens: 7 source, then target
            assert ((moved - sequence[0, :7]).abs().amax(dim=-1) > 1e-6).all()
            target = model.sequence_features(other, tgt)[0, src.shape[1] :]
            assert ((target - sequence[0, src.shape[1] :]).abs().amax(dim=-1) > 1e-6).all()


def test_causal_masks():
    model = make_model(source_attention="causal")
    src, tgt = pair()
    other = src.clone()
    other[0, 4] = 13 if src[0, 4] != 13 else 14
    with torch.no_grad():
        sequence, moved = model.sequence_features(src, tgt), model.sequence_features(other, tgt)
    torch.testing.assert_close(moved[0, :4], sequence[0, :4])
    assert ((moved[0, 4:7] - sequence[0, 4:7]).abs().amax(dim=-1) > 1e-6).all()
    assert ((moved[0, src.shape[1] :] - sequence[0, src.shape[1] :]).abs().amax(dim=-1) > 1e-6).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_padding_changes_nothing(variant, positions):
    model = make_model(source_attention=variant, target_positions=positions)
    src, tgt = pair()
    short = src[1:, :4]  # row 1 alone: 3 ids + EOS, without the padding a batch gives it
    with torch.no_grad():
        batched = model(src, tgt)[1]
        alone = model(short, tgt[1:])[0]
        longer_target = model(src, torch.cat([tgt, torch.full((2, 3), PAD_ID)], dim=1))[:, :6]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(longer_target[1], batched, atol=1e-5, rtol=1e-4)


def test_target_positions_continue_or_restart():
    src, tgt = pair()
    with torch.no_grad():
        outputs = {p: make_model(target_positions=p)(src, tgt) for p in ("continue", "restart")}
    assert not torch.allclose(outputs["continue"], outputs["restart"])


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_incremental_decoding_equals_full_recomputation(variant, norm, positions):
    model = make_model(source_attention=variant, norm=norm, target_positions=positions)
    src, tgt = pair(1)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])]
        state = model.encode(src)
        first = model.decode_step(tgt[:, :3], state)  # several tokens at once, then one
        after = model.decode_step(tgt[:, 3:4], state)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first, full[:, 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after, full[:, 3], atol=1e-5, rtol=1e-4)


def test_state_select_reorder_and_nbytes():
    model = make_model()
    src, tgt = pair(2)
    with torch.no_grad():
        state = model.encode(src)
        assert state.nbytes == 2 * len(model.layers) * src.numel() * 64 * 4  # k and v, float32
        swapped = state.select(torch.tensor([1, 0]))
        ours = model.decode_step(tgt[:, :1], state)
        theirs = model.decode_step(tgt.flip(0)[:, :1], swapped)
    torch.testing.assert_close(theirs, ours.flip(0))


# --------------------------------------------------------------------------- search


def naive_greedy(model, src_row: torch.Tensor, max_len: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(max_len):
        with torch.no_grad():
            logits = model(src_row[None], torch.tensor([[BOS_ID] + tokens]))[0, -1]
        logits[[PAD_ID, BOS_ID]] = float("-inf")
        token = int(logits.argmax())
        if token == EOS_ID:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_one_equals_greedy_without_cache(variant):
    model = make_model(source_attention=variant)
    src = make_src(SOURCES)
    out = beam_search(model, src, beam=1, max_len_a=1.0, max_len_b=5, min_len=0)
    expected = [naive_greedy(model, src[i], len(SOURCES[i]) + 1 + 5) for i in range(len(SOURCES))]
    assert [h[0].tokens for h in out] == expected
    assert [h[0].tokens for h in greedy_search(model, src, max_len_a=1.0, max_len_b=5, min_len=0)] == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_alone_equals_in_a_batch(variant):
    model = make_model(seed=4, source_attention=variant)
    together = beam_search(model, make_src(SOURCES), beam=4, nbest=2)
    for row, source in enumerate(SOURCES):
        alone = beam_search(model, make_src([source]), beam=4, nbest=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[row]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[row]], abs=1e-5)


def test_scores_prefixes_and_sampling():
    model = make_model(seed=5)
    src = make_src(SOURCES)
    prefixes = [[9, 9], [], [4], [17, 18]]
    out = beam_search(model, src, beam=3, nbest=2, prefix=prefixes, lenpen=0.0)
    for row, prefix in enumerate(prefixes):
        assert len(out[row]) == 2
        for h in out[row]:
            assert h.tokens[: len(prefix)] == prefix
            with torch.no_grad():
                lp = torch.log_softmax(model(src[row : row + 1], torch.tensor([[BOS_ID] + h.tokens])), dim=-1)
            target = torch.tensor(h.tokens + [EOS_ID])
            assert h.score == pytest.approx(float(lp[0].gather(1, target[:, None]).sum()), abs=1e-4)
    samples = sample(model, src, nbest=3, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = greedy_search(model, src)
    assert [[h.tokens for h in hyps] for hyps in samples] == [[g[0].tokens] * 3 for g in greedy]


def test_output_stops_where_positions_run_out():
    torch.manual_seed(0)
    model = DecoderOnly(tiny(max_positions=16, target_positions="continue"), 30, 30).eval()
    out = beam_search(model, make_src([[5] * 9]), beam=2, max_len_a=3, max_len_b=50, min_len=0)
    assert len(out[0][0].tokens) <= 16 - 10 - 1  # source + EOS, then BOS and the output


# --------------------------------------------------------------------------- through the CLI

# Causal with continuing positions: the variant CTranslate2 can run.
DECODER_ONLY = {"arch": "decoder_only", "size": "tiny_decoder_only", "dropout": 0.1, "source_attention": "causal",
                "target_positions": "continue"}


def train(config: Path, *args: str):
    return runner.invoke(app, ["train", "-c", str(config), *args])


def run_dir(config: Path) -> Path:
    return load_config(config).experiment.dir


def train_losses(config: Path) -> list[float]:
    rows = map(json.loads, (run_dir(config) / "train_log.jsonl").read_text().splitlines())
    return [row["loss"] for row in rows if row["type"] == "train"]


def test_trains_and_resumes_bit_exactly(trainkit_experiment, monkeypatch):
    # Dropout, a weight average and the source LM loss are on: equality needs all of the
    # trainer's state restored, whatever the architecture.
    sections = {"model": DECODER_ONLY, "train": {"ema_decay": 0.9, "source_loss_weight": 0.5}}
    straight = trainkit_experiment("straight", **sections)
    assert train(straight).exit_code == 0
    losses = train_losses(straight)
    assert len(losses) == 4 and losses[-1] < losses[0]

    interrupted = trainkit_experiment("interrupted", **sections)
    real_step, calls = mtkit.train.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(mtkit.train, "train_step", step_then_signal)
    assert train(interrupted).exit_code == 130
    monkeypatch.undo()
    result = train(interrupted, "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = (load_file(str(run_dir(c) / "checkpoints" / "last" / "model.safetensors")) for c in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def decoder_only_run(trainkit_prepared, tmp_path_factory) -> Path:
    """A causal decoder-only model trained 8 updates on the synthetic experiment."""
    directory = tmp_path_factory.mktemp("decoder_only")
    config = copy_experiment(trainkit_prepared, directory / "run", directory / "run.yaml", model=DECODER_ONLY)
    result = train(config)
    assert result.exit_code == 0, result.stderr
    return directory / "run"


def translate_bytes(run: Path, raw: bytes, tmp_path: Path):
    source = tmp_path / "in.txt"
    source.write_bytes(raw)
    return runner.invoke(app, ["translate", "-m", str(run), "-i", str(source), "--beam", "2", "--threads", "1",
                               "--long-lines", "truncate"])


def test_checkpoint_translates_hostile_text_line_exactly(decoder_only_run, tmp_path):
    lines = [
        "kato \u200frimu\u200f", "", "\x1b[31mkato\x1b[0m \x07", "   ", "\ufeffka\u00adto\u200b",
        "\U0001f600 kato", "\u0000", "kato rimu sena " * 30_000, "sena\u2028rimu", "\x85 lo",
    ]
    raw = "\n".join(lines).encode() + b"\n\r\nlo pe\rshi\n\xff\xfe\n"
    result = translate_bytes(decoder_only_run, raw, tmp_path)
    assert result.exit_code == 0, result.stderr
    out = result.stdout_bytes.split(b"\n")
    assert len(out) == raw.count(b"\n") + 1 and out[-1] == b""
    assert out[1] == out[3] == b""  # empty and blank lines stay empty
    assert "line 8: " in result.stderr and "truncated to 1022" in result.stderr  # room left for the BOS
    assert "invalid UTF-8" in result.stderr and "Traceback" not in result.stderr
    # The same lines translated one at a time give the same output lines.
    for number in (0, 2, 5):
        alone = translate_bytes(decoder_only_run, lines[number].encode() + b"\n", tmp_path)
        assert alone.stdout_bytes == out[number] + b"\n"


def test_ctranslate2_export_and_parity(decoder_only_run, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2"
    sample = tmp_path / "sample.txt"
    sample.write_text("kato rimu sena\nlo pe\nka to shi rimu kato sena lo\nsena\nrimu rimu ka\nto\n")
    result = runner.invoke(app, ["export", "ctranslate2", str(decoder_only_run), str(out), "--sample", str(sample)])
    assert result.exit_code == 0, result.output
    assert "parity on 6 sentences" in result.stdout and "greedy 100% identical" in result.stdout
    assert {"model.bin", "config.json", "vocabulary.json"} <= {p.name for p in out.iterdir()}

    # Token log-probabilities of a fixed target after the prompt agree with mtkit's forward pass.
    loaded = load_for_inference(decoder_only_run)
    generator = ctranslate2.Generator(str(out), device="cpu", intra_threads=1)
    pieces = json.loads((out / "vocabulary.json").read_text())
    src, tgt = make_src([[5, 9, 11, 7], [6, 8]]), [[13, 4, 9], [10, 12, 13, 5, 6]]
    prompts = [[pieces[i] for i in row.tolist() if i != PAD_ID] + ["<s>"] for row in src]
    sequences = [p + [pieces[i] for i in ids + [EOS_ID]] for p, ids in zip(prompts, tgt, strict=True)]
    scored = generator.score_batch(sequences)
    tgt_in = torch.full((2, 6), PAD_ID)
    for row, ids in enumerate(tgt):
        tgt_in[row, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(loaded.model(src, tgt_in), dim=-1)
    for row, ids in enumerate(tgt):
        expected = [log_probs[row, t, token].item() for t, token in enumerate([*ids, EOS_ID])]
        assert scored[row].log_probs[-len(expected) :] == pytest.approx(expected, abs=1e-4)


def test_exports_that_cannot_take_the_model_are_refused_in_one_line(decoder_only_run, tmp_path):
    pytest.importorskip("ctranslate2")
    loaded = load_for_inference(decoder_only_run)
    with pytest.raises(MtkitError, match="model.arch=decoder_only: Marian is an encoder-decoder"):
        export(HuggingFaceExporter(), loaded, tmp_path / "hf")
    loaded.config.model.source_attention = "bidirectional"
    with pytest.raises(MtkitError, match="CTranslate2 runs decoder-only models with causal attention only") as err:
        export(CTranslate2Exporter(), loaded, tmp_path / "ct2")
    assert "\n" not in str(err.value) and not (tmp_path / "ct2").exists()

"""Today's blocks as model options (RMSNorm, rotary and relative positions, gated feed-forward,
no biases, grouped-query attention) in both architectures: incremental decoding equals full
recomputation for every combination, padding changes nothing, the key/value cache shrinks with
``kv_heads``, the pieces compute what their papers (and transformers) compute, the family presets
are parameter-matched, and a model with them trains and translates through the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.config import ModelConfig, load_config
from mtkit.models import build_model
from mtkit.models.layers import FeedForward, RelativeBias, Rotary, make_norm, rotate
from mtkit.search import beam_search
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

BLOCKS = [  # (positions, activation, norm_type, kv_heads, bias, norm)
    ("rope", "swiglu", "rms", 2, False, "pre"),
    ("rope", "relu", "layer", None, True, "post"),
    ("relative", "geglu", "rms", 1, False, "pre"),
    ("relative", "gelu", "layer", 2, True, "post"),
    ("sinusoidal", "swiglu", "rms", 1, True, "pre"),
    ("learned", "geglu", "layer", 2, False, "pre"),
]
ARCHS = [  # (arch, size, source_attention, target_positions)
    ("encoder_decoder", "tiny", "bidirectional", "restart"),
    ("decoder_only", "tiny_decoder_only", "bidirectional", "restart"),
    ("decoder_only", "tiny_decoder_only", "causal", "continue"),
]


def make_model(arch: tuple, block: tuple, seed: int = 0, vocab: int = 40):
    kind, size, source_attention, target_positions = arch
    positions, activation, norm_type, kv_heads, bias, norm = block
    cfg = ModelConfig(arch=kind, size=size, source_attention=source_attention, target_positions=target_positions,
                      positions=positions, activation=activation, norm_type=norm_type, kv_heads=kv_heads, bias=bias,
                      norm=norm, dropout=0.0, max_positions=64)
    torch.manual_seed(seed)
    return build_model(cfg, vocab, vocab).eval()


def pair(seed: int = 0, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded sources ending in EOS, and targets from BOS."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (3, 8), generator=gen)
    for row, length in enumerate([8, 5, 3]):
        src[row, length - 1] = EOS_ID
        src[row, length:] = PAD_ID
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, vocab, (3, 5), generator=gen)], dim=1)
    return src, tgt


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a[0]}-{a[2]}-{a[3]}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "-".join(map(str, b)))
def test_incremental_decoding_equals_full_recomputation(arch, block):
    model = make_model(arch, block)
    src, tgt = pair()
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(3)]
        steps.append(model.decode_step(tgt[:, 3:5], state))  # several tokens after a prefix
        last = model.decode_step(tgt[:, 5:6], state)
    torch.testing.assert_close(torch.stack(steps[:3], dim=1), full[:, :3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(steps[3], full[:, 4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last, full[:, 5], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a[0]}-{a[2]}-{a[3]}")
@pytest.mark.parametrize("block", BLOCKS[:3], ids=lambda b: "-".join(map(str, b)))
def test_a_sentence_translates_alone_as_in_a_padded_batch(arch, block):
    model = make_model(arch, block, seed=3)
    src, _ = pair(seed=1)
    together = beam_search(model, src, beam=3, nbest=2, max_len_a=0.0, max_len_b=6)
    for row in range(src.shape[0]):
        length = int((src[row] != PAD_ID).sum())
        alone = beam_search(model, src[row : row + 1, :length], beam=3, nbest=2, max_len_a=0.0, max_len_b=6)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[row]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[row]], abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS[:2], ids=lambda a: a[0])
def test_the_key_value_cache_holds_kv_heads(arch):
    src, tgt = pair()
    sizes = {}
    for kv_heads in (None, 2, 1):
        model = make_model(arch, ("rope", "swiglu", "rms", kv_heads, False, "pre"))
        with torch.no_grad():
            state = model.encode(src)
            model.decode_step(tgt, state)
        sizes[kv_heads] = state.nbytes
    assert sizes[None] == 2 * sizes[2] == 4 * sizes[1]  # tiny: 4 query heads


def test_rotary_scores_depend_on_the_distance_only():
    cfg = ModelConfig(size="tiny", positions="rope", rope_base=100.0)
    rotary = Rotary(cfg)
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 1, 1, 1, cfg.d_model // cfg.heads, generator=gen)

    def score(q_position: int, k_position: int) -> float:
        q = rotate(query, rotary(torch.tensor([q_position])))
        k = rotate(key, rotary(torch.tensor([k_position])))
        return float((q * k).sum())

    assert score(7, 3) == pytest.approx(score(20, 16), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    assert score(0, 0) == pytest.approx(float((query * key).sum()), abs=1e-6)  # position 0: no rotation


def test_rotary_equals_transformers_llama():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    positions = torch.tensor([[0, 3, 9, 30]])
    cos, sin = modeling.LlamaRotaryEmbedding(config)(torch.zeros(1), positions)
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 1, 4, 4, 16, generator=gen)
    theirs = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    ours = Rotary(ModelConfig(size="tiny", positions="rope", rope_base=500.0))(positions[0])
    torch.testing.assert_close(rotate(query, ours), theirs[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rotate(key, ours), theirs[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_t5s(bidirectional):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    distance = torch.arange(-300, 300)[None, :]
    ours = RelativeBias(ModelConfig(size="tiny", positions="relative"), bidirectional).bucket(distance)
    theirs = t5.T5Attention._relative_position_bucket(distance, bidirectional=bidirectional, num_buckets=32,
                                                      max_distance=128)
    assert torch.equal(ours, theirs)
    assert int(ours.min()) == 0 and int(ours.max()) == 31  # every bucket used


def test_relative_bias_is_one_scalar_per_head_and_bucket():
    cfg = ModelConfig(size="tiny", positions="relative", relative_buckets=8, relative_max_distance=16)
    bias = RelativeBias(cfg, bidirectional=True)
    out = bias(torch.arange(5), torch.arange(7))
    assert out.shape == (1, cfg.heads, 5, 7)
    # keys at and before the query take the first half of the buckets, keys after it the second
    torch.testing.assert_close(out[0, :, 2, 2], bias.embed.weight[0])
    torch.testing.assert_close(out[0, :, 2, 3], bias.embed.weight[4 + 1])  # one ahead: second half, bucket 1
    torch.testing.assert_close(out[0, :, 3, 2], bias.embed.weight[1])  # one behind


@pytest.mark.parametrize("arch", ARCHS[:2], ids=lambda a: a[0])
def test_head_width_attention_scale_and_output_scale(arch):
    """T5's options: heads * head_dim apart from d_model, unscaled attention logits, the output
    scaled by d_model^-0.5 before a tied projection."""
    kind, size = arch[:2]
    cfg = ModelConfig(arch=kind, size=size, head_dim=24, heads=2, kv_heads=1, positions="relative",
                      scale_attention=False, scale_output=True, bias=False, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 40, 40).eval()
    src, tgt = pair()
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        steps = torch.stack([model.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])], dim=1)
        unscaled = model.cfg.model_copy(update={"scale_output": False})
        plain = build_model(unscaled, 40, 40).eval()
        plain.load_state_dict(model.state_dict())
        expected = model.output_proj(plain.features(src, tgt) * cfg.d_model**-0.5)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-4)
    assert model.output_proj.weight is model.tgt_embed.weight
    attention = next(m for m in model.modules() if hasattr(m, "qkv_proj"))
    assert attention.qkv_proj.weight.shape == (2 * 24 + 2 * 24, cfg.d_model) and attention.scale == 1.0


def test_rms_norm_and_gated_feed_forward_compute_their_formulas():
    cfg = ModelConfig(size="tiny", norm_type="rms", norm_eps=1e-6, activation="swiglu", bias=False)
    x = torch.randn(2, 3, cfg.d_model)
    norm = make_norm(cfg)
    torch.nn.init.normal_(norm.weight)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ffn = FeedForward(cfg)
    assert ffn.gate is not None and ffn.fc1.bias is None and ffn.fc2.bias is None
    torch.testing.assert_close(ffn(x), ffn.fc2(F.silu(ffn.gate(x)) * ffn.fc1(x)))
    geglu = FeedForward(cfg.model_copy(update={"activation": "geglu"}))
    torch.testing.assert_close(geglu(x), geglu.fc2(F.gelu(geglu.gate(x), approximate="tanh") * geglu.fc1(x)))
    assert "bias" not in dict(make_norm(cfg.model_copy(update={"norm_type": "layer"})).named_parameters())


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("src_embed", "tgt_embed", "output_proj", "positions")))


@pytest.mark.parametrize(("preset", "peer"), [("t5_small", "small"), ("t5_base", "base"), ("llama_small", "small"),
                                              ("llama_base", "base")])
def test_family_presets_are_parameter_matched(preset, peer):
    ours, theirs = (build_model(ModelConfig(size=size), 100, 100) for size in (preset, peer))
    assert non_embedding_parameters(ours) == pytest.approx(non_embedding_parameters(theirs), rel=0.01)
    cfg = ours.cfg
    assert (cfg.norm_type, cfg.bias) == ("rms", False)
    if preset.startswith("llama"):
        assert (cfg.arch, cfg.positions, cfg.activation, cfg.kv_heads) == ("decoder_only", "rope", "swiglu", 2)
    else:
        assert (cfg.arch, cfg.positions, cfg.activation) == ("encoder_decoder", "relative", "geglu")


@pytest.mark.parametrize(("settings", "message"), [
    ({"kv_heads": 3}, "kv_heads (3) must divide heads (4)"),
    ({"positions": "rope", "d_model": 72, "heads": 8}, "the head width (9) must be even"),
    ({"d_model": 70}, "heads (4) must divide d_model (70), or give head_dim"),
])
def test_block_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(size="tiny", **settings)


@pytest.mark.parametrize("model", [
    {"size": "tiny", "norm_type": "rms", "positions": "relative", "activation": "geglu", "bias": False},
    {"arch": "decoder_only", "size": "tiny_decoder_only", "norm_type": "rms", "positions": "rope",
     "activation": "swiglu", "bias": False, "kv_heads": 2},
], ids=["t5-style", "llama-style"])
def test_a_model_with_todays_blocks_trains_and_translates_through_the_cli(trainkit_experiment, model, tmp_path):
    config = trainkit_experiment(model={**model, "dropout": 0.1}, train={"max_steps": 6})
    result = runner.invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    run = load_config(config).experiment.dir
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["type"] == "train"]
    assert losses[-1] < losses[0]
    source = tmp_path / "in.txt"
    source.write_text("kato rimu\n\nsena lo pe\n", encoding="utf-8")
    result = runner.invoke(app, ["translate", "-m", str(run), "-i", str(source), "--beam", "2", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_every_block_combination_builds():
    """Every value of every block option, in both architectures, builds and runs a step."""
    src, tgt = pair()
    for arch, positions, activation, norm_type in itertools.product(
            ARCHS[:2], ["sinusoidal", "sinusoidal_fairseq", "learned", "rope", "relative"],
            ["relu", "gelu", "silu", "swiglu", "geglu"], ["layer", "rms"]):
        model = make_model(arch, (positions, activation, norm_type, 2, False, "pre"))
        with torch.no_grad():
            assert torch.isfinite(model(src, tgt)).all()


def test_the_huggingface_export_refuses_todays_blocks_in_one_line(trainkit_prepared, tmp_path):
    pytest.importorskip("transformers")
    from test_export_ct2_options import random_run

    from mtkit.export import HuggingFaceExporter

    loaded = random_run(trainkit_prepared, tmp_path / "run", {"size": "t5_small", "d_model": 64, "heads": 4,
                                                              "ffn_dim": 96})
    problems = HuggingFaceExporter().problems(loaded)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("model.norm_type=rms, model.bias=false, model.positions=relative, "
                                  "model.activation=geglu: ")


PROMPT = ("decoder_only", "tiny_decoder_only", "causal", "continue")


def test_a_prompt_continued_without_separator_is_the_causal_lm_of_prompt_and_target():
    """``model.separator: none`` on (prompt + EOS, BOS + target) computes what the same weights
    compute on the sequence ``prompt target`` with the prompt's last token as the first target
    input (``separator: eos_bos`` given the prompt without it)."""
    block = ("rope", "swiglu", "rms", 2, False, "pre")
    joined = make_model(PROMPT, block)
    prompted = build_model(joined.cfg.model_copy(update={"separator": "none"}), 40, 40).eval()
    prompted.load_state_dict(joined.state_dict())
    src, tgt = pair(seed=2)
    lengths = (src != PAD_ID).sum(dim=1) - 1  # prompts without the EOS
    with torch.no_grad():
        ours = prompted(src, tgt)
        for row, length in enumerate(lengths.tolist()):
            prompt = src[row, :length]
            expected = joined(prompt[None, :-1], torch.cat([prompt[-1:], tgt[row, 1:]])[None])
            torch.testing.assert_close(ours[row], expected[0], atol=1e-5, rtol=1e-4)
        state = prompted.encode(src)
        steps = torch.stack([prompted.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])], dim=1)
    torch.testing.assert_close(steps, ours, atol=1e-5, rtol=1e-4)
    together = beam_search(prompted, src, beam=3, nbest=2, max_len_a=0.0, max_len_b=5)
    for row, length in enumerate(lengths.tolist()):
        alone = beam_search(prompted, src[row : row + 1, : length + 1], beam=3, nbest=2, max_len_a=0.0,
                            max_len_b=5)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[row]]


def test_separator_none_is_refused_outside_a_continuing_decoder_only_model():
    with pytest.raises(ValueError, match="separator none is for arch decoder_only with target_positions continue"):
        ModelConfig(size="tiny", separator="none")
    model = build_model(ModelConfig(arch="decoder_only", size="tiny_decoder_only", source_attention="causal",
                                    target_positions="continue", separator="none"), 40, 40)
    with pytest.raises(ValueError, match="at least two tokens"):
        model.encode(torch.tensor([[7, EOS_ID]]))

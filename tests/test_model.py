import pytest
import torch

from mtkit.config import ModelConfig
from mtkit.models.encoder_decoder import Transformer
from mtkit.models.layers import dropout
from mtkit.vocab import PAD_ID


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(size="tiny", dropout=0.0, **overrides)


def batch(generator: torch.Generator, vocab: int = 50):
    src = torch.randint(4, vocab, (3, 7), generator=generator)
    src[0, 5:] = PAD_ID  # padded rows must not change the others
    tgt = torch.randint(4, vocab, (3, 6), generator=generator)
    return src, tgt


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_incremental_decoding_equals_full_recomputation(norm, positions):
    gen = torch.Generator().manual_seed(0)
    model = Transformer(tiny(norm=norm, positions=positions), 50, 50).eval()
    src, tgt = batch(gen)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_prefix_then_steps_equals_full():
    gen = torch.Generator().manual_seed(1)
    model = Transformer(tiny(), 50, 50).eval()
    src, tgt = batch(gen)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        first = model.decode_step(tgt[:, :3], state)
        rest = model.decode_step(tgt[:, 3:5], state)  # several tokens after a prefix
        last = model.decode_step(tgt[:, 5:6], state)
    torch.testing.assert_close(first, full[:, 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rest, full[:, 4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last, full[:, 5], atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_other_positions():
    gen = torch.Generator().manual_seed(2)
    model = Transformer(tiny(), 50, 50).eval()
    src, tgt = batch(gen)
    with torch.no_grad():
        alone = model(src[:1, :5], tgt[:1])
        padded = model(src[:1], tgt[:1])
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_state_select_reorders_rows():
    gen = torch.Generator().manual_seed(3)
    model = Transformer(tiny(), 50, 50).eval()
    src, tgt = batch(gen)
    rows = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = model.encode(src)
        model.decode_step(tgt[:, :2], state)
        picked = state.select(rows)
        out = model.decode_step(tgt[rows, 2:3], picked)
        reference = model(src[rows], tgt[rows, :3])[:, -1]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def test_state_nbytes_counts_both_caches():
    gen = torch.Generator().manual_seed(4)
    cfg = tiny()
    model = Transformer(cfg, 50, 50).eval()
    src, tgt = batch(gen)  # 3 rows, 7 source positions
    per_position = 2 * cfg.decoder_layers * 3 * cfg.d_model * 4  # keys and values, fp32, all rows
    with torch.no_grad():
        state = model.encode(src)
        assert state.nbytes == 7 * per_position  # cross-attention keys/values of the source
        model.decode_step(tgt[:, :2], state)
        assert state.nbytes == 9 * per_position  # + two target positions of self-attention


def test_shared_and_tied_embeddings():
    model = Transformer(tiny(), 50, 50)
    assert model.src_embed is model.tgt_embed
    assert model.output_proj.weight is model.tgt_embed.weight
    separate = Transformer(tiny(), 40, 50)
    assert separate.src_embed is not separate.tgt_embed
    assert separate.output_proj.weight.shape == (50, 64)
    # Two separate vocabularies of equal size are still two vocabularies.
    not_joint = Transformer(tiny(), 50, 50, joint_vocab=False)
    assert not_joint.src_embed is not not_joint.tgt_embed


def test_named_sizes():
    small = ModelConfig(size="small")
    assert (small.d_model, small.encoder_layers, small.heads, small.ffn_dim) == (256, 3, 4, 1024)
    base = ModelConfig(size="base", encoder_layers=4)
    assert (base.d_model, base.encoder_layers, base.decoder_layers) == (512, 4, 6)


def test_too_long_input_is_a_clear_error():
    model = Transformer(tiny(max_positions=8), 50, 50)
    with pytest.raises(ValueError, match="max_positions=8"):
        model(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    out = dropout(x, 0.1, training=True)
    kept = out.detach() != 0
    # every one of the four 16-bit lanes of each random word drops at the rate asked for
    lane_rates = 1.0 - kept.reshape(-1, 4).float().mean(dim=0)
    assert torch.allclose(lane_rates, torch.full((4,), 0.1), atol=0.003)
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.equal(out.detach()[kept], torch.full((int(kept.sum()),), scale))
    assert abs(out.detach().mean().item() - 1.0) < 0.003  # the expectation is kept
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient = mask * scale


def test_bf16_dropout_scales_in_float():
    """The scale 1/(1-p) is not rounded to bf16 before it multiplies (1.1111 would become
    1.109375 and every kept activation would come out 0.16% low)."""
    torch.manual_seed(0)
    x = torch.randn(500, 1000).bfloat16()
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    ratio = (out.float()[kept] / x.float()[kept]).mean().item()
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert abs(ratio / scale - 1.0) < 2e-4


def test_dropout_is_seeded_and_off_in_eval():
    x = torch.randn(7, 33)
    torch.manual_seed(3)
    first = dropout(x, 0.3, training=True)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.3, training=True))
    assert 0.15 < (first == 0).float().mean().item() < 0.45
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    half = x.bfloat16()
    assert dropout(half, 0.3, training=True).dtype == torch.bfloat16


def test_cpu_autocast_training_attends_in_fp32(monkeypatch):
    """Under CPU bf16 autocast, training attention runs in fp32 (PyTorch's bf16 CPU attention
    backward is several times slower); the projections still run in bf16."""
    import mtkit.models.layers as model_module

    seen = []
    real = model_module.F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.dtype)
        return real(query, *args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(size="tiny", dropout=0.1), 50, 50).train()
    src = torch.randint(4, 50, (3, 7))
    tgt = torch.randint(4, 50, (3, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert seen and set(seen) == {torch.float32}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

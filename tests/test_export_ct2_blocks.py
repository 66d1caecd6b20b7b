"""CTranslate2 for the block options (``model.norm_type``, ``bias``, ``kv_heads``, ``positions``
rope and relative, ``activation`` swiglu and geglu, ``head_dim``, ``scale_attention``,
``scale_output``), in the encoder-decoder and in the causal
decoder-only model: the export scores every target token as mtkit does and the ctranslate2
backend translates as the torch backend does."""

from __future__ import annotations

import pytest
from helpers.backends import make_translator
from test_export_ct2_options import DECODER_ONLY, mtkit_log_probs, random_run

ctranslate2 = pytest.importorskip("ctranslate2")

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = {
    "rms-swiglu-nobias-gqa-rope": {"norm": "pre", "norm_type": "rms", "activation": "swiglu", "bias": False,
                                   "kv_heads": 2, "positions": "rope"},
    "relative-geglu-mqa": {"norm": "pre", "positions": "relative", "activation": "geglu", "kv_heads": 1,
                           "relative_buckets": 8, "relative_max_distance": 12},
    "layer-rope-base": {"norm": "pre", "positions": "rope", "rope_base": 500.0, "norm_eps": 1e-3},
    "post-rms-nobias": {"norm": "post", "norm_type": "rms", "bias": False, "embedding_norm": True},
    "t5-head-dim-unscaled-tied": {"norm": "pre", "norm_type": "rms", "positions": "relative", "activation": "geglu",
                                  "bias": False, "heads": 2, "head_dim": 24, "scale_attention": False,
                                  "scale_output": True, "scale_embeddings": False},
    "decoder-only-rms-swiglu-gqa-rope": {**DECODER_ONLY, "norm_type": "rms", "activation": "swiglu", "bias": False,
                                         "kv_heads": 2, "positions": "rope"},
    "decoder-only-relative-geglu-mqa": {**DECODER_ONLY, "positions": "relative", "activation": "geglu",
                                        "kv_heads": 1, "relative_buckets": 8, "relative_max_distance": 12},
    "decoder-only-post-layer-nobias": {**DECODER_ONLY, "norm": "post", "bias": False, "positions": "rope"},
    "decoder-only-prompt-rope-gqa": {**DECODER_ONLY, "separator": "none", "norm_type": "rms", "positions": "rope",
                                     "activation": "swiglu", "bias": False, "kv_heads": 2},
    "decoder-only-head-dim-unscaled": {**DECODER_ONLY, "heads": 2, "head_dim": 16, "scale_attention": False,
                                       "scale_output": True},
}

LINES = ["the cat sat on the mat", "a dog", "the big red house is green", "woman walks", "tree",
         "the dog sat on the big red mat and the cat walks", "green", "a woman sat", "the house", "cat and dog"]
TARGETS = ["red house", "the dog sat", "a", "green tree walks on", "cat", "the mat is red and the house is big",
           "dog", "a cat", "tree walks", "woman"]


def ct2_log_probs(loaded, out, sources: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
    """CTranslate2's log-probability of each target token and of the EOS after it."""
    pieces = loaded.tokenizers.src.vocabulary()
    if loaded.model.has_encoder:
        runtime = ctranslate2.Translator(str(out), intra_threads=1)
        scored = runtime.score_batch([[pieces[i] for i in ids] for ids in sources],
                                     [[pieces[i] for i in ids] for ids in targets])
        return [result.log_probs for result in scored]
    runtime = ctranslate2.Generator(str(out), intra_threads=1)  # the prompt ``source </s> <s>``, or ``source``
    separator = ["</s>", "<s>"] if loaded.config.model.separator == "eos_bos" else []
    prompts = [[pieces[i] for i in ids] + separator + [pieces[i] for i in ids_out] + ["</s>"]
               for ids, ids_out in zip(sources, targets, strict=True)]
    # log_probs[k] is the sequence's token k + 1's: the target's first comes after the prompt
    return [result.log_probs[len(ids) + len(separator) - 1 :]
            for result, ids in zip(runtime.score_batch(prompts), sources, strict=True)]


@pytest.mark.parametrize("options", BLOCKS.values(), ids=BLOCKS.keys())
def test_block_options_score_and_translate_alike_in_ctranslate2(options, trainkit_prepared, tmp_path):
    from mtkit.export import CTranslate2Exporter, export

    loaded = random_run(trainkit_prepared, tmp_path / "run", options)
    assert CTranslate2Exporter().problems(loaded) == []
    out = export(CTranslate2Exporter(), loaded, tmp_path / "ct2")

    sources = loaded.tokenizers.src.encode(LINES)
    targets = loaded.tokenizers.tgt.encode(TARGETS)
    expected = mtkit_log_probs(loaded, sources, targets)
    found = ct2_log_probs(loaded, out, sources, targets)
    worst = max(abs(a - b) for theirs, ours in zip(found, expected, strict=True)
                for a, b in zip(theirs, ours, strict=True))
    print(f"max |log-prob difference|: {worst:.2e}")
    for theirs, ours in zip(found, expected, strict=True):
        assert theirs == pytest.approx(ours, abs=1e-4)

    if loaded.model.has_encoder:
        decode = loaded.config.decode.model_copy(update={"beam": 1, "max_len_b": 12})
        ours = make_translator(loaded, "torch", decode).translate(LINES)
        theirs = make_translator(loaded, "ctranslate2", decode).translate(LINES)
        assert theirs == ours
    else:  # the backend runs encoder-decoders only; a Generator is prompted with ``source </s> <s>``
        from mtkit.engines.ctranslate2 import ct2_parity

        parity = ct2_parity(loaded, out, LINES)
        assert parity.greedy_identical == 1.0, parity.differences

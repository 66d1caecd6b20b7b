"""``mtkit export huggingface`` for every encoder-decoder kind: transformers' ``generate`` (with the
saved generation config and ``custom_generate``) writes what ``mtkit translate`` writes, the
export imports back to a run that translates identically, and an imported Marian model exports
back to its own outputs."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.data import copy_experiment, random_checkpoint
from helpers.hf_models import SOURCES, make_marian

from mtkit.config import validate_config
from mtkit.export import HF_CLASSES, huggingface_model, huggingface_state_dict
from mtkit.hf_generate import generate, source_limits
from mtkit.models.encoder_decoder import Transformer
from mtkit.search import max_lengths
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses"),
              pytest.mark.usefixtures("one_thread")]

KINDS = {
    "marian": {"norm": "post"},
    "blenderbot": {"norm": "pre"},  # mtkit's default
    "mbart": {"norm": "pre", "embedding_norm": True, "positions": "learned", "share_positions": False},
    "bart": {"norm": "post", "embedding_norm": True, "positions": "sinusoidal_fairseq", "activation": "silu",
             "output_bias": True, "scale_embeddings": False},
}
"""Model options of each kind, by the transformers ``model_type`` it exports as."""

TINY = {"size": "tiny", "d_model": 32, "ffn_dim": 64, "max_positions": 64, "dropout": 0.0}
TRAIN = {"max_steps": 150, "max_tokens": 600, "lr": 0.003, "warmup_steps": 20, "valid_every": 1000,
         "log_every": 1000}
DECODE = {"beam": 4, "max_len_a": 1.2, "max_len_b": 3, "lenpen": 1.0}


@pytest.fixture(scope="module")
def exported(trainkit_prepared, tmp_path_factory) -> Callable[[str], tuple[Path, Path, str]]:
    """Factory: ``(run, export, the export's stdout)`` of one kind, trained (150 steps: enough
    for sentences that end) and exported once per module."""
    root = tmp_path_factory.mktemp("hf_kinds")
    made: dict[str, tuple[Path, Path, str]] = {}

    def make(kind: str) -> tuple[Path, Path, str]:
        if kind not in made:
            config = copy_experiment(trainkit_prepared, root / kind, root / f"{kind}.yaml",
                                     model={**TINY, **KINDS[kind]}, train=TRAIN, decode=DECODE)
            trained = invoke("train", "-c", str(config))
            assert trained.exit_code == 0, trained.stderr
            result = invoke("export", "huggingface", str(root / kind), str(root / f"{kind}_hf"))
            assert result.exit_code == 0, result.stderr
            made[kind] = (root / kind, root / f"{kind}_hf", result.stdout)
        return made[kind]

    return make


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sources") / "sources.txt"
    path.write_text("".join(line + "\n" for line in SOURCES), encoding="utf-8")
    return path


def mtkit_translate(run: Path, sources: Path, *args: str) -> list[str]:
    # float32: the precision transformers computes in (auto may measure and pick bfloat16)
    result = invoke("translate", "-m", str(run), "-i", str(sources), "--backend", "torch", "--compute-type",
                    "float32", *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_writes_what_mtkit_translate_writes(kind, exported, sources):
    run, out, stdout = exported(kind)
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"] == kind
    assert "parity on 20 sentences from the valid split: greedy 100% identical, beam 4 100% identical" in stdout

    # The tokenizer, loaded as any transformers tokenizer, gives mtkit's ids (and the source's EOS).
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from mtkit.checkpoint import load_for_inference

    ours = load_for_inference(run).tokenizers.src.encode(SOURCES)
    assert tokenizer(SOURCES).input_ids == [[*ids, EOS_ID] for ids in ours]

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    config = model.generation_config
    assert (config.num_beams, config.length_penalty, config.early_stopping) == (4, 1.0, True)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert config.bad_words_ids == [[PAD_ID], [BOS_ID], [UNK_ID]]  # decode.allow_unk is off
    # Plain generate's one limit: mtkit's for the longest source training kept (data.max_len).
    assert config.max_length == min(63, math.floor(1.2 * 251 + 3)) + 2

    inputs = tokenizer(SOURCES, return_tensors="pt", padding=True)
    for beam in (1, 4):
        with torch.inference_mode():
            theirs = tokenizer.batch_decode(model.generate(**inputs, num_beams=beam), skip_special_tokens=True)
        expected = mtkit_translate(run, sources, "--beam", str(beam))
        # MarianTokenizer strips a text's ends; mtkit keeps what the pieces say.
        assert theirs == [line.strip() for line in expected], f"beam {beam}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_imports_back_to_the_same_translations(kind, exported, sources, tmp_path):
    run, out, _ = exported(kind)
    result = invoke("import", "huggingface", str(out), "-o", str(tmp_path / "back"))
    assert result.exit_code == 0, result.stderr
    # The import reads beam and length penalty from the generation config, not the length limit.
    flags = ("--max-len-a", "1.2", "--max-len-b", "3", "--beam", "4")
    assert mtkit_translate(tmp_path / "back", sources, *flags) == mtkit_translate(run, sources, *flags)


def test_imported_marian_exports_back_to_its_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    original = make_marian(root / "hf", steps=120)  # outputs need not end: both get one length limit
    assert invoke("import", "huggingface", str(original), "-o", str(root / "run")).exit_code == 0
    result = invoke("export", "huggingface", str(root / "run"), str(root / "back"))
    assert result.exit_code == 0, result.stderr
    assert "greedy 100% identical, beam 4 100% identical" in result.stdout

    outputs = {}
    for name in ("hf", "back"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / name)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(root / name).eval()
        inputs = tokenizer(SOURCES, return_tensors="pt", padding=True)
        # The same search for both: the per-sentence limit (the original's own max_length cuts
        # long outputs, where the export forces EOS) and mtkit's stop (the original's
        # early_stopping is transformers' default heuristic).
        config = copy.deepcopy(model.generation_config)
        config.max_len_a, config.max_len_b = 1.5, 10  # (update() sets only attributes the config has)
        config.early_stopping = True
        for beam in (1, 4):
            config.num_beams = beam
            with torch.inference_mode():
                generated = generate(model=model, **inputs, generation_config=config)
            outputs[name, beam] = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert outputs["back", 1] == outputs["hf", 1]
    assert outputs["back", 4] == outputs["hf", 4]
    # The duplicated start column (Marian starts from <pad>) stays masked in the export.
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(root / "back")
    assert back.final_logits_bias[0, PAD_ID] < -1000


def test_separate_vocabularies_of_different_sizes_pad_to_one():
    cfg = validate_config({"model": {**TINY, "norm": "pre"}}).model
    torch.manual_seed(0)
    ours = Transformer(cfg, 40, 52, joint_vocab=False).eval()
    target = HF_CLASSES[("pre", False)]
    theirs = huggingface_model(cfg, ours).eval()
    theirs.load_state_dict(huggingface_state_dict(ours, target, theirs.config.vocab_size), strict=True)
    src = torch.tensor([[5, 9, 11, 7, EOS_ID], [6, 8, EOS_ID, PAD_ID, PAD_ID]])
    tgt_in = torch.tensor([[BOS_ID, 5, 50, 11], [BOS_ID, 6, 8, 51]])
    with torch.no_grad():
        expected = torch.log_softmax(ours(src, tgt_in), dim=-1)
        logits = theirs(input_ids=src, attention_mask=(src != PAD_ID).long(), decoder_input_ids=tgt_in).logits
    assert logits.shape[-1] == 52
    torch.testing.assert_close(torch.log_softmax(logits, dim=-1), expected, atol=1e-5, rtol=1e-5)


def test_source_limits_are_mtkits():
    src = torch.tensor([[5, 6, EOS_ID, PAD_ID], [5, 6, 7, EOS_ID], [EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    for a, b in ((1.2, 3), (1.5, 10), (0.0, 80)):
        expected = max_lengths(src, a, b, 64, floor=torch.ones(3, dtype=torch.long))
        assert source_limits((src != PAD_ID).sum(dim=1), a, b, 64, min_new_tokens=1).tolist() == expected.tolist()


def test_what_transformers_cannot_compute_is_refused_in_one_line(trainkit_prepared, tmp_path):
    prepared = copy.deepcopy(trainkit_prepared)
    prepared["model"] = {**TINY, "norm": "post", "positions": "learned"}
    run = random_checkpoint(prepared, tmp_path)
    result = invoke("export", "huggingface", str(run), str(tmp_path / "hf"))
    one_line_error(result, "model.positions=learned", "MarianMTModel", "model.embedding_norm: true")
    assert not (tmp_path / "hf").exists()

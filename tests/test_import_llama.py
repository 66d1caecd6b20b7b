"""``mtkit import huggingface`` on Llama-layout language models built and trained here (Llama 3's
byte-level tokenizer with BOS, Mistral's SentencePiece-style one with a sliding window, Qwen2's
without BOS and with query/key/value biases; ``helpers.hf_models.LLAMA_FAMILIES``), translating by
continuing a prompt: mtkit's prompt ids, logits and translations equal transformers' own, and a
fine-tuned copy learns a new task on the target after the prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.data import write_config
from helpers.hf_models import LLAMA_FAMILIES, LLAMA_PROMPT, SOURCES, llama_ids, make_llama

transformers = pytest.importorskip("transformers")

MAX_NEW = 60  # generate's max_new_tokens and mtkit's --max-len-b
STEPS = {"llama": 250, "mistral": 60, "qwen2": 60}
"""Training steps of each test model: Llama's writes sentences that end (for beam search and
fine-tuning); the others' parity needs their shapes and word-like output, not their skill."""


@pytest.fixture(scope="module", params=LLAMA_FAMILIES)
def llama(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(the family, the transformers model directory, the run imported from it)."""
    root = tmp_path_factory.mktemp(request.param)
    source = make_llama(root / "hf", family=request.param, steps=STEPS[request.param])
    run = root / "run"
    result = invoke("import", "huggingface", str(source), "-o", str(run), "--source-lang", "English",
                    "--target-lang", "German")
    assert result.exit_code == 0, result.output
    return request.param, source, run


@pytest.fixture(scope="module")
def reference(llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama[1])
    model = transformers.AutoModelForCausalLM.from_pretrained(llama[1]).eval()
    return tokenizer, model


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _to_model(reference) -> dict[int, int]:
    """mtkit id -> the model's id, for every row the model has (not the rows mtkit adds)."""
    from mtkit.huggingface import causal_rows

    tokenizer, model = reference
    rows = causal_rows(model.config, tokenizer)
    return {i: row for i, row in enumerate(rows) if row < model.config.vocab_size}


def test_the_run_is_a_decoder_only_model_with_the_prompt(llama, reference):
    from mtkit.checkpoint import load_for_inference

    family, _, run = llama
    _, model = reference
    loaded = load_for_inference(run)
    cfg, hf = loaded.config.model, model.config
    assert (cfg.arch, cfg.separator, cfg.source_attention, cfg.target_positions) == (
        "decoder_only", "none", "causal", "continue")
    assert (cfg.norm, cfg.norm_type, cfg.positions, cfg.activation) == ("pre", "rms", "rope", "swiglu")
    assert (cfg.heads, cfg.kv_heads, cfg.decoder_layers) == (4, 2, 2)
    assert cfg.attention_head_dim == (16 if family == "mistral" else 8)
    assert cfg.bias == (family == "qwen2") and cfg.tie_output == hf.tie_word_embeddings
    assert cfg.max_positions == (192 if family == "mistral" else 256)  # Mistral's sliding window bounds it
    assert loaded.tokenizers.prompt == LLAMA_PROMPT
    assert loaded.tokenizers.source_bos == (family != "qwen2")
    assert (loaded.config.data.src_lang, loaded.config.data.tgt_lang) == ("English", "German")


def test_prompt_ids_equal_the_models_tokenizer(llama, reference):
    from mtkit.checkpoint import load_for_inference

    tokenizer, _ = reference
    loaded = load_for_inference(llama[2])
    to_model = _to_model(reference)
    texts = SOURCES + ["Zwei Hunde, 3 Katzen: 1.5 Mäuse!", "digits 2026 and  spaces"]
    ours = [[to_model[i] for i in ids] for ids in loaded.tokenizers.encode_source(texts)]
    assert ours == [llama_ids(tokenizer, text) for text in texts]
    # Output ids map back to the model's text (Mistral's tokenizer, without byte fallback, knows
    # only the characters it was trained on).
    targets = ["akaken ouqihsen 12"] + (["Zwei Hunde, 3 Katzen!"] if llama[0] != "mistral" else [])
    assert loaded.tokenizers.tgt.decode(loaded.tokenizers.tgt.encode(targets)) == targets


def test_logits_equal_transformers_in_a_padded_batch(llama, reference):
    """mtkit's batch (prompts of different lengths, padded) against transformers on each
    sequence alone: the target's logits, on every column of the model's vocabulary."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import causal_rows
    from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

    tokenizer, model = reference
    loaded = load_for_inference(llama[2])
    to_model = _to_model(reference)
    generator = torch.Generator().manual_seed(0)
    ids = list(to_model)
    sources = loaded.tokenizers.encode_source(SOURCES[:6])
    targets = [[ids[int(j)] for j in torch.randint(4, len(ids), (n,), generator=generator)] for n in (3, 9, 5, 1, 7, 4)]
    src = _padded([ids + [EOS_ID] for ids in sources])  # as mtkit.batching lays a batch out
    tgt_in = _padded([[BOS_ID, *ids] for ids in targets])
    assert bool((src == PAD_ID).any()) and bool((tgt_in == PAD_ID).any())
    with torch.no_grad():
        ours = loaded.model(src, tgt_in)
        columns = sorted(to_model)
        worst = 0.0
        for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
            sequence = torch.tensor([[to_model[i] for i in source + target]])
            theirs = model(sequence).logits[0, len(source) - 1 :]  # from the prompt's last token on
            mine = ours[row, : len(target) + 1, columns]
            worst = max(worst, (mine - theirs[:, [to_model[c] for c in columns]]).abs().max().item())
    assert worst < 1e-4
    # The rows mtkit adds (PAD, UNK where the model has none) never take probability.
    rows = causal_rows(model.config, tokenizer)
    added = [i for i, row in enumerate(rows) if row >= model.config.vocab_size]
    assert added and len(rows) == ours.shape[-1] and torch.log_softmax(ours, -1)[..., added].max().item() < -1e3


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


def _generate(reference, beam: int) -> tuple[list[str], list[bool]]:
    """transformers' continuations of each prompt, alone (no padding), and whether each ended."""
    tokenizer, model = reference
    texts, ended = [], []
    for source in SOURCES:
        prompt = torch.tensor([llama_ids(tokenizer, source)])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False, num_beams=beam, length_penalty=1.0,
                                 early_stopping=beam > 1 or None, pad_token_id=tokenizer.eos_token_id)
        new = out[0, prompt.shape[1] :].tolist()
        ended.append(tokenizer.eos_token_id in new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts, ended


def _translate(run: Path, tmp_path: Path, lines: list[str], *options: str):
    source = tmp_path / "src.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return invoke("translate", "-m", str(run), "-i", str(source), "--lenpen", "1.0", "--length-penalty-form",
                  "length", "--max-len-a", "0", "--max-len-b", str(MAX_NEW), "--threads", "1", *options)


@pytest.mark.parametrize("beam", [1, 4])
def test_translations_equal_generate(llama, reference, tmp_path, one_thread, beam):
    """Every translation that ends; greedy, the others up to the length limit (mtkit counts the EOS
    it forces there, transformers stops without it)."""
    family, _, run = llama
    if beam > 1 and family != "llama":
        pytest.skip("beam search is compared on the trained model, whose sentences end")
    theirs, ended = _generate(reference, beam)
    result = _translate(run, tmp_path, SOURCES, "--beam", str(beam), "--backend", "auto")
    assert result.exit_code == 0, result.output
    # CTranslate2 runs no decoder-only search: auto says so in one line and takes PyTorch.
    assert sum("backend: torch" in line for line in result.stderr.splitlines()) == 1, result.stderr
    ours = [line.strip() for line in result.stdout.splitlines()]
    compared = [i for i in range(len(SOURCES)) if ended[i]]
    assert len(compared) >= (50 if family == "llama" else 0)  # the barely trained ones end none
    assert [ours[i] for i in compared] == [theirs[i] for i in compared]
    if beam == 1:
        # The others are cut at the limit, which mtkit's EOS takes a token of. The barely trained
        # models repeat themselves, where two tokens can tie to 1e-5 (seen once in 60 sentences):
        # float rounding decides those.
        cut = [i for i in range(len(SOURCES)) if not ended[i]]
        parted = sum(not theirs[i].startswith(ours[i]) for i in cut)
        assert parted <= (0 if family == "llama" else 2), [(ours[i], theirs[i]) for i in cut]


def test_translate_writes_one_line_per_input_line(llama, tmp_path, one_thread):
    lines = [SOURCES[0], "", SOURCES[1], "   ", SOURCES[2]]
    result = _translate(llama[2], tmp_path, lines, "--beam", "2", "--backend", "torch")
    assert result.exit_code == 0, result.output
    ours = result.stdout.splitlines()
    assert len(ours) == len(lines) and ours[1] == ours[3] == ""


def _new_task(count: int, seed: int) -> list[tuple[str, str]]:
    """A task the model was not trained on: its translation, then the word ``okay``."""
    from helpers.data import tokdata_pairs

    return [(src, f"{tgt} okay") for src, tgt in tokdata_pairs(count, seed)]


def test_fine_tuning_learns_a_new_task_on_the_prompt(llama, tmp_path, one_thread):
    """``pretrained.run`` on the imported model: prepare puts each source in the prompt (BOS
    first where the model's tokenizer has one), the loss is on the target, and the tuned model
    writes the new task's translations where the imported one wrote the old task's."""
    import pyarrow as pa
    import sacrebleu

    from mtkit.checkpoint import load_for_inference

    family, _, run = llama
    if family != "llama":
        pytest.skip("fine-tuning is shown on the trained model")
    files = {}
    for split, count, seed in (("train", 400, 21), ("valid", 30, 22)):
        pairs = _new_task(count, seed)
        for side, k in (("src", 0), ("tgt", 1)):
            path = tmp_path / f"{split}.{side}"
            path.write_text("".join(pair[k] + "\n" for pair in pairs), encoding="utf-8")
        files[split] = {"src": str(tmp_path / f"{split}.src"), "tgt": str(tmp_path / f"{split}.tgt")}
    config = write_config(tmp_path / "tune.yaml", {
        "experiment": {"dir": str(tmp_path / "tuned")},
        "data": {"train": files["train"], "valid": files["valid"]},
        "pretrained": {"run": str(run)},
        "train": {"max_tokens": 2000, "max_steps": 120, "warmup_steps": 10, "lr": 0.003, "log_every": 20,
                  "valid_every": 120, "valid_bleu": False, "best_metric": "loss", "label_smoothing": 0.0,
                  "threads": 1, "precision": "fp32"},
        "decode": {"beam": 1, "backend": "torch"},
    })
    for command in ("tokenizer", "prepare", "train"):
        args = ("tokenizer", "train") if command == "tokenizer" else (command,)
        result = invoke(*args, "-c", str(config))
        assert result.exit_code == 0, result.output
    tuned = load_for_inference(tmp_path / "tuned")
    assert tuned.tokenizers.prompt == LLAMA_PROMPT
    prepared = pa.ipc.open_file(str(tmp_path / "tuned" / "data" / "train.arrow")).read_all()
    first = prepared.slice(0, 1).to_pylist()[0]
    assert first["src_ids"] == tuned.tokenizers.encode_source([first["src"]])[0]
    sources = [src for src, _ in _new_task(30, 22)]
    references = [tgt for _, tgt in _new_task(30, 22)]
    scores = {}
    for name, model in (("imported", run), ("tuned", tmp_path / "tuned")):
        result = _translate(model, tmp_path, sources, "--beam", "1", "--backend", "torch")
        assert result.exit_code == 0, result.output
        hyps = result.stdout.splitlines()
        scores[name] = (sum(hyp.endswith(" okay") for hyp in hyps), sacrebleu.corpus_chrf(hyps, [references]).score)
    assert scores["imported"][0] == 0 and scores["tuned"][0] >= 24, scores  # of 30
    assert scores["tuned"][1] > scores["imported"][1], scores


def test_prompt_errors_are_one_line(llama, tmp_path):
    family, source, _ = llama
    if family != "llama":
        pytest.skip("one family shows the import's checks")
    out = tmp_path / "run"
    one_line_error(invoke("import", "huggingface", str(source), "-o", str(out)), "--source-lang",
                   "a language model's prompt names the languages")
    one_line_error(invoke("import", "huggingface", str(source), "-o", str(out), "--prompt", "Translate: "),
                   "--prompt", "{source} exactly once")
    result = invoke("import", "huggingface", str(source), "-o", str(out), "--prompt", "Q: {source}\\nA:")
    assert result.exit_code == 0, result.output
    from mtkit.checkpoint import load_for_inference

    assert load_for_inference(out).tokenizers.prompt == "Q: {source}\nA:"
    scaled = tmp_path / "scaled"
    shutil.copytree(source, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    (scaled / "config.json").write_text(json.dumps(config))
    one_line_error(invoke("import", "huggingface", str(scaled), "-o", str(tmp_path / "r2"), "--source-lang", "en",
                          "--target-lang", "de"), "config.json: rope scaling 'linear' is not supported")
    assert not (tmp_path / "r2").exists()

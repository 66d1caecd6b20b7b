"""An imported Hugging Face run in every command besides import: translate (a multi-target
Marian model's languages, prefixes), serve (its languages over HTTP), compare and average.

One tiny multi-target Marian model (``>>deu<<`` and ``>>fra<<`` first in the source; trained
to write French in capitals) is built and imported once for the module; what mtkit writes is
checked against transformers' ``generate`` on the same inputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.data import random_checkpoint, tokdata_pairs
from helpers.hf_models import SOURCES, make_marian

from mtkit.checkpoint import load_for_inference, read_meta, save_checkpoint
from mtkit.serve import Engine, Pair, create_app, language_name, matches
from mtkit.vocab import MASKED_LOGIT, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCES = [tgt for _, tgt in tokdata_pairs(60, seed=12)]
"""The references of ``SOURCES`` (the same draw)."""
GREEDY = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "40"]
"""Greedy search to at most 40 tokens, as ``generate`` runs transformers."""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_marian(tmp_path_factory.mktemp("hf") / "multi", languages=["deu", "fra"])


@pytest.fixture(scope="module")
def run(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "run"
    result = invoke("import", "huggingface", str(hf_dir), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def generate(hf_dir):
    """transformers' greedy translations of lines into a target language, and for each whether
    it ended (a line cut at the length limit may differ from mtkit's in a trailing space)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()

    def run(code: str, lines: list[str], prefix: str | None = None) -> tuple[list[str], list[bool]]:
        inputs = tokenizer([f">>{code}<< {line}" for line in lines], return_tensors="pt", padding=True)
        extra: dict[str, Any] = {}
        if prefix is not None:  # one line: the decoder starts from its start token and the prefix
            ids = tokenizer(text_target=prefix, add_special_tokens=False)["input_ids"]
            extra["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id, *ids]])
            extra["max_new_tokens"] = 40 - len(ids)
        with torch.no_grad():
            out = model.generate(**inputs, num_beams=1, do_sample=False, **{"max_new_tokens": 40, **extra})
        ended = [bool((row[1:] == model.config.eos_token_id).any()) for row in out]
        return tokenizer.batch_decode(out, skip_special_tokens=True), ended

    return run


@pytest.fixture(scope="module")
def reference(generate) -> dict[str, list[str]]:
    """transformers' translations of ``SOURCES``, by target language."""
    return {code: generate(code, SOURCES)[0] for code in ("deu", "fra")}


@pytest.fixture(scope="module")
def ending(generate) -> list[int]:
    """The lines of ``SOURCES`` whose translations end in both languages."""
    ended = [generate(code, SOURCES)[1] for code in ("deu", "fra")]
    return [i for i, flags in enumerate(zip(*ended, strict=True)) if all(flags)]


def translate(run: Path, *args: str, lines: list[str] = SOURCES) -> list[str]:
    result = invoke("translate", "-m", str(run), "--backend", "torch", *args, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


# --------------------------------------------------------------------------- translate


def test_translate_into_each_target_language_as_transformers_does(run, reference, ending):
    german = translate(run, "--target-lang", "deu", *GREEDY)
    french = translate(run, "--target-lang", "fra", *GREEDY)
    assert len(ending) >= len(SOURCES) // 2
    for code, mine in (("deu", german), ("fra", french)):
        assert [mine[i] for i in ending] == [reference[code][i] for i in ending]
        assert [text.rstrip() for text in mine] == [text.rstrip() for text in reference[code]]
    assert sum(g != f for g, f in zip(german, french, strict=True)) > len(SOURCES) // 2


def test_translate_without_a_target_language_names_the_option_and_the_languages(run):
    result = invoke("translate", "-m", str(run), input="ka to\n")
    one_line_error(result, "--target-lang", "deu", "fra")
    wrong = invoke("translate", "-m", str(run), "--target-lang", "spa", input="ka to\n")
    one_line_error(wrong, "--target-lang", "'spa'", "deu, fra")


def test_a_prefix_is_continued_as_transformers_continues_it(run, generate, reference, ending, tmp_path):
    lines = [SOURCES[i] for i in ending[:6]]
    prefixes = [" ".join(reference["fra"][i].split()[:2]) for i in ending[:6]]
    prefix_file = tmp_path / "prefixes.txt"
    prefix_file.write_text("\n".join(prefixes) + "\n", encoding="utf-8")
    got = translate(run, "--target-lang", "fra", "--prefix", str(prefix_file), *GREEDY, lines=lines)
    expected = [generate("fra", [line], prefix)[0][0] for line, prefix in zip(lines, prefixes, strict=True)]
    assert got == expected
    assert all(text.startswith(prefix) for text, prefix in zip(got, prefixes, strict=True))


# --------------------------------------------------------------------------- serve


def post(port: int, payload: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/translate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("code, served, expected", [
    ("de", ["deu", "fra"], ["deu"]),  # Marian's ISO 639-3 codes
    ("de", ["deu_Latn", "fra_Latn"], ["deu_Latn"]),  # NLLB's
    ("de", ["de_DE", "en_XX"], ["de_DE"]),  # mBART-50's
    ("deu", ["de", "en"], ["de"]),  # M2M100's
    ("deu", ["deu", "de"], ["deu"]),  # a served code is itself
    ("zh", ["zho_Hans", "zho_Hant", "eng"], ["zho_Hans", "zho_Hant"]),  # ambiguous
    ("no", ["nob", "nno"], ["nno", "nob"]),
    ("pt_br", ["pt_BR", "pt"], ["pt_BR"]),
    ("pt", ["pt_BR", "pt"], ["pt"]),
    ("es", ["deu", "fra"], []),
    ("src", ["src", "tgt"], ["src"]),
])
def test_a_client_code_matches_the_served_codes_of_its_language(code, served, expected):
    assert matches(code, served) == expected


@pytest.mark.parametrize("code, name", [
    ("de", "German"), ("deu", "German"), ("deu_Latn", "German (Latn)"), ("de_DE", "German (DE)"),
    ("cmn_Hans", "Chinese (Hans)"), ("src", "src"), ("xyz", "xyz"),
])
def test_served_codes_are_named(code, name):
    assert language_name(code) == name


def test_a_many_to_many_model_serves_every_pair_of_its_languages_and_a_marian_one_each_target():
    from mtkit.cli.serve_cmd import served_pairs
    from mtkit.tokenizer import Languages

    def run(languages: Languages | None) -> Any:
        return SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(src_lang="en", tgt_lang="tgt")),
                               tokenizers=SimpleNamespace(languages=languages))

    many = Languages(tokens={"de": "__de__", "en": "__en__", "fr": "__fr__"}, source="src", target="tgt")
    marian = Languages(tokens={"deu": ">>deu<<", "fra": ">>fra<<"}, source="tgt", target=None)
    assert served_pairs(run(many)) == [("de", "en", "de", "en"), ("de", "fr", "de", "fr"), ("en", "de", "en", "de"),
                                       ("en", "fr", "en", "fr"), ("fr", "de", "fr", "de"), ("fr", "en", "fr", "en")]
    assert served_pairs(run(marian)) == [("en", "deu", None, "deu"), ("en", "fra", None, "fra")]
    assert served_pairs(run(None)) == [("en", "tgt", None, None)]


def test_serve_lists_the_target_languages_and_translates_into_the_one_asked(run, reference, ending):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", "-m", str(run), "--port", "0", "--threads",
                                "1", "--beam", "1", "--set", "decode.max_len_a=0", "--set", "decode.max_len_b=40",
                                "--set", "decode.backend=torch"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stderr is not None
        ready = process.stderr.readline()
        match = re.fullmatch(r"mtkit: serving src->deu, src->fra on http://127\.0\.0\.1:(\d+)\n", ready)
        assert match, ready
        port = int(match.group(1))
        assert get(port, "/languages") == [{"code": "deu", "name": "German", "targets": []},
                                           {"code": "fra", "name": "French", "targets": []},
                                           {"code": "src", "name": "src", "targets": ["deu", "fra"]}]
        text = [SOURCES[i] for i in ending[:3]]
        german, french = [reference["deu"][i] for i in ending[:3]], [reference["fra"][i] for i in ending[:3]]
        # LibreTranslate's codes reach the model's: de -> deu, fr -> fra.
        assert post(port, {"q": text, "source": "src", "target": "de"}) == (200, {"translatedText": german})
        assert post(port, {"q": text, "source": "auto", "target": "fra"}) == (200, {"translatedText": french})
        status, error = post(port, {"q": "ka", "source": "src", "target": "es"})
        assert status == 400 and error["error"].startswith("target: 'es' is not a language this server translates")
        status, error = post(port, {"q": "ka", "source": "en", "target": "deu"})
        assert status == 400 and error["error"].startswith("source: 'en'")
        info = get(port, "/info")["models"]
        assert len(info) == 1 and (info[0]["sources"], info[0]["targets"]) == (["src"], ["deu", "fra"])
        process.terminate()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_requests_for_different_targets_at_once_each_get_their_language(run, reference, ending):
    """One engine serves both pairs; requests in flight together are batched by language."""
    from mtkit.config import DecodeConfig
    from mtkit.engines import open_translator

    loaded = load_for_inference(run)
    decode = DecodeConfig(beam=1, max_len_a=0, max_len_b=40, backend="torch")
    engine = Engine(open_translator(loaded, decode, tgt_lang="deu"), max_wait=0.2)
    pairs = [Pair("src", code, engine, src_lang=None, tgt_lang=code) for code in ("deu", "fra")]
    app = create_app(pairs)
    lines = [SOURCES[i] for i in ending[:8]]

    async def scenario() -> list[Any]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answers = await asyncio.gather(*[
                    client.post("/translate", json={"q": [line], "source": "src", "target": code})
                    for line in lines for code in ("de", "fr")])
        return [answer.json()["translatedText"][0] for answer in answers]

    answers = asyncio.run(scenario())
    assert answers[0::2] == [reference["deu"][i] for i in ending[:8]]
    assert answers[1::2] == [reference["fra"][i] for i in ending[:8]]
    assert engine.stats.batches >= 2


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def test_files(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("test_set")
    (directory / "test.src").write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    (directory / "test.tgt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    return directory / "test.src", directory / "test.tgt"


def compare(*args: str) -> dict[str, Any]:
    result = invoke("compare", *args, "--samples", "20", "--speed-sentences", "4", "--speed-beam", "2", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_compare_an_imported_run_with_itself_and_with_an_mtkit_run(run, test_files, trainkit_prepared, tmp_path):
    src, ref = test_files
    same = compare(str(run), str(run / "checkpoints" / "final"), "--test", str(src), str(ref), "--target-lang", "deu")
    first, second = same["systems"]
    assert first["bleu"] == second["bleu"] > 0 and second["tests"][0]["same_as_baseline"]
    assert first["kv_cache_bytes_per_sentence"] > 0 and first["decode_sent_per_s"]["batch_1"] > 0

    mine = random_checkpoint(trainkit_prepared, tmp_path)
    mixed = compare(str(mine), str(run), "--test", str(src), str(ref), "--target-lang", "fra")
    theirs = mixed["systems"][1]
    assert theirs["bleu"] == theirs["tests"][0]["bleu"] and not theirs["tests"][0]["same_as_baseline"]

    missing = invoke("compare", str(run), "--test", str(src), str(ref), "--speed-sentences", "0")
    one_line_error(missing, str(run), "--target-lang", "deu, fra")


# --------------------------------------------------------------------------- average


def test_average_of_an_imported_and_a_fine_tuned_checkpoint_keeps_the_masked_column(run, tmp_path):
    imported = run / "checkpoints" / "step_00000000"
    loaded = load_for_inference(imported)
    torch.manual_seed(0)
    with torch.no_grad():  # a stand-in for fine-tuning: every weight moved, the masked column kept
        for name, tensor in loaded.model.state_dict().items():
            if name != "output_proj.bias":
                tensor.add_(0.01 * torch.randn_like(tensor))
    tuned_run = tmp_path / "tuned"
    save_checkpoint(tuned_run / "checkpoints", step=50, epoch=1, model=loaded.model, config=loaded.config,
                    tokenizers=loaded.tokenizers, metrics={"loss": 1.0}, trainer_state={}, best=True, keep_last=1)
    tuned = tuned_run / "checkpoints" / "step_00000050"
    out = tmp_path / "average"
    result = invoke("average", str(imported), str(tuned), "-o", str(out))
    assert result.exit_code == 0, result.stderr

    before, after = load_for_inference(imported).model.state_dict(), load_for_inference(out).model.state_dict()
    moved = loaded.model.state_dict()
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, (before[name] + moved[name]) / 2)
    assert after["output_proj.bias"][PAD_ID].item() == MASKED_LOGIT
    assert read_meta(out)["averaged_steps"] == [0, 50]
    averaged = load_for_inference(out).model
    with torch.no_grad():
        logits = averaged(torch.tensor([[5, 6, 7, 3]]), torch.tensor([[2, 5, 6]]))
    assert torch.softmax(logits, dim=-1)[..., PAD_ID].max().item() == 0.0
    assert all(translate(out, "--target-lang", "deu", *GREEDY, lines=SOURCES[:10]))

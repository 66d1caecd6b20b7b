"""``mtkit compare``: two or more translation systems side by side, with error bars.

A system is a run directory (``RUN``, or one of its checkpoints: ``RUN/checkpoints/last``,
``RUN/checkpoints/step_00004000``, an averaged checkpoint), translated here with the
checkpoint's own decode settings, or a hypothesis file (one line per test line). Runs go
through the public path only (``mtkit.engines.open_translator`` with the PyTorch engine at
float32, ``mtkit.evaluate.translate_and_score``, and the search interface ``model.encode`` /
``model.decode_step`` / ``state.nbytes``), so any architecture that ``mtkit translate`` runs can
be compared, and a run scores as training's validation would score it.

Per test set and system: BLEU and chrF (``mtkit.score``, with their signatures), sacrebleu's
paired bootstrap resampling of every system against the first (95% interval and p-value), the
hypothesis/reference length ratio and BLEU by source length. Per run: parameters (embedding and
the rest), the training recorded in its checkpoint (updates, target tokens/s, wall-clock time),
decoding speed at batch 32 and batch 1 measured here, and the key/value cache per sentence.
``Report.markdown()`` and ``Report.to_json()`` render the result; docs/compare.md says how each
figure is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtkit.errors import MtkitError
from mtkit.score import MetricScore, read_text, score
from mtkit.score import compare as paired_bootstrap

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.translate import Translator

FORMAT = "mtkit-compare/1"
METRICS = ("bleu", "chrf")
DEFAULT_BUCKETS = (10, 15, 20, 30)
"""Upper edges (source words) of the length buckets: <=10, 11-15, 16-20, 21-30, >30."""
SPEED_BATCH = 32
DEFAULT_SPEED_SENTENCES = 256
DEFAULT_SPEED_BEAM = 5
TEST_PLACEHOLDER = "{test}"
"""In a hypothesis file's name, replaced by each test set's name (several --test sets)."""
_ONE_BATCH = 1 << 30
"""``decode.batch_tokens`` and ``batch_sentences`` that put every line of a call into one batch."""


# --------------------------------------------------------------------------- inputs


@dataclass
class TestSet:
    """Source and reference lines (the same count). ``source``/``reference`` say where they
    came from (file names, or a run's prepared test split)."""

    name: str
    sources: list[str]
    references: list[str]
    source: str
    reference: str
    src_lang: str | None = None
    """The direction of one part of a multilingual run's test split (None: the runs' own, or
    ``--source-lang``/``--target-lang``)."""
    tgt_lang: str | None = None


@dataclass
class Options:
    """How to compare (the defaults are ``mtkit compare``'s)."""

    lang: str | None = None
    """Target language for BLEU's tokenizer (default: ``tgt_lang``, else the first run's data.tgt_lang)."""
    tokenize: str | None = None
    """BLEU tokenizer, over ``lang``."""
    samples: int = 1000
    """Bootstrap resamples."""
    buckets: Sequence[int] = DEFAULT_BUCKETS
    """Upper edges, in source words, of the length buckets (ascending)."""
    device: str = "cpu"
    speed_sentences: int = DEFAULT_SPEED_SENTENCES
    """Sentences of the first test set timed at batch 32 (a quarter of them at batch 1); 0: no timing."""
    speed_beam: int = DEFAULT_SPEED_BEAM
    src_lang: str | None = None
    """A multilingual run's source language, as its code (default: the run's data.src_lang)."""
    tgt_lang: str | None = None
    """A multilingual run's target language (default: the run's data.tgt_lang)."""


def test_name(path: Path | str) -> str:
    """A test set's name from its source file: ``newstest2014.en.gz`` -> ``newstest2014``."""
    name = Path(path).name.removesuffix(".gz")
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def read_test_sets(pairs: Sequence[tuple[Path, Path]]) -> list[TestSet]:
    """The ``--test SRC REF`` sets; MtkitError naming the file for a missing file, different
    line counts or two sets of the same name."""
    sets = []
    for src, ref in pairs:
        sources, references = read_text(src), read_text(ref)
        if len(sources) != len(references):
            raise MtkitError(f"{src} has {len(sources)} lines but {ref} has {len(references)}")
        if not references:
            raise MtkitError(f"{ref}: no lines: nothing to score")
        sets.append(TestSet(test_name(src), sources, references, str(src), str(ref)))
    names = [t.name for t in sets]
    for name in names:
        if names.count(name) > 1:
            raise MtkitError(f"--test: two test sets are named {name!r} (from their source files); rename one")
    return sets


@dataclass
class System:
    """One system as given on the command line: ``checkpoint`` for a run, else a hypothesis file."""

    name: str
    checkpoint: Path | None = None
    run_root: Path | None = None
    """The run directory around the checkpoint, if any (its prepared test split is the default)."""

    @property
    def is_run(self) -> bool:
        return self.checkpoint is not None


def find_system(given: str) -> System:
    """A run (a directory holding a checkpoint) or a hypothesis file; MtkitError naming
    ``given`` otherwise."""
    from mtkit.checkpoint import resolve

    path = Path(given)
    if TEST_PLACEHOLDER in given or path.is_file():
        return System(given)
    if not path.exists():
        raise MtkitError(f"{given}: no such run directory or hypothesis file")
    if not path.is_dir():
        raise MtkitError(f"{given}: not a run directory or a regular file")
    checkpoint = resolve(path)
    root = None
    if (path / "checkpoints").is_dir():
        root = path
    elif checkpoint.parent.name == "checkpoints":
        root = checkpoint.parent.parent
    return System(given, checkpoint, root)


def hypothesis_file(system: System, test: TestSet, tests: int) -> Path:
    """The hypothesis file of ``system`` for ``test`` (one of ``tests`` sets)."""
    if TEST_PLACEHOLDER in system.name:
        return Path(system.name.replace(TEST_PLACEHOLDER, test.name))
    if tests > 1:
        raise MtkitError(
            f"{system.name}: one hypothesis file for {tests} test sets; put {TEST_PLACEHOLDER} in its name "
            "(replaced by each test set's name, e.g. hyps/{test}.de) or pass one --test"
        )
    return Path(system.name)


def run_test_sets(systems: Sequence[System]) -> list[TestSet]:
    """The test split that every run was prepared with (``mtkit pipeline`` translates and
    scores it), when they share it; MtkitError otherwise. A multilingual test split is one test
    set per direction, each translated and scored in its languages."""
    from mtkit.checkpoint import read_checkpoint_config
    from mtkit.data import data_dir, load_split, split_file, split_groups

    runs = [s for s in systems if s.is_run]
    if not runs:
        raise MtkitError("no --test SRC REF given, and no run directory to take a test set from")
    found: list[list[TestSet]] = []
    for run in runs:
        assert run.checkpoint is not None
        if run.run_root is None:
            raise MtkitError(f"{run.name}: a checkpoint outside a run directory has no test split; pass --test SRC REF")
        config = read_checkpoint_config(run.checkpoint)
        if config.data.test is None:
            raise MtkitError(f"{run.name}: no test set configured (data.test); pass --test SRC REF")
        split = load_split(run.run_root, "test")
        corpora = config.data.eval_sets("test")
        names = [test_name(corpus.src) if corpus.src is not None else "test" for corpus in corpora]
        where = str(split_file(data_dir(run.run_root), "test"))
        sources, references = list(split["src"]), list(split["tgt"])
        groups = split_groups(run.run_root, "test")
        if len(groups) == 1:
            found.append([TestSet(names[0], sources, references, where, where)])
            continue
        names = names if len(names) == len(groups) else [names[0]] * len(groups)
        found.append([TestSet(f"{name} {g.direction}", sources[g.start : g.end], references[g.start : g.end],
                              where, where, g.src_lang, g.tgt_lang) for name, g in zip(names, groups, strict=True)])
    def content(tests: list[TestSet]) -> list[tuple]:
        return [(t.sources, t.references, t.src_lang, t.tgt_lang) for t in tests]

    first = found[0]
    for run, tests in zip(runs[1:], found[1:], strict=True):
        if content(tests) != content(first):
            raise MtkitError(f"{run.name} and {runs[0].name} were prepared with different test sets; "
                             "pass --test SRC REF")
    return first


# --------------------------------------------------------------------------- results


@dataclass
class Resampled:
    """A paired bootstrap result: the mean score over the resamples, the half-width of its 95%
    interval, and the p-value against the first system (None for the first)."""

    mean: float
    ci: float
    p_value: float | None


@dataclass
class Scores:
    """One system on one test set. ``bootstrap``: per metric (bleu, chrf), with two or more
    systems."""

    bleu: MetricScore
    chrf: MetricScore
    length_ratio: float | None
    bleu_by_length: list[float | None]
    bootstrap: dict[str, Resampled] = field(default_factory=dict)
    same_as_baseline: bool = False
    """Line for line the first system's output (sacrebleu then gives p = 1 / (samples + 1))."""


@dataclass
class SystemReport:
    """What is known of one system; None where a figure does not apply or was not recorded."""

    name: str
    kind: str
    """``run`` or ``hypotheses``."""
    checkpoint: str | None = None
    params: dict[str, int] | None = None
    updates: int | None = None
    train_seconds: float | None = None
    train_tgt_tok_per_s: float | None = None
    decode_sent_per_s: dict[str, float] | None = None
    kv_cache_bytes: float | None = None
    scores: list[Scores] = field(default_factory=list)
    """One per test set, in the report's order."""


@dataclass
class Report:
    test_sets: list[TestSet]
    buckets: list[tuple[str, int, int | None]]
    """(label, lowest, highest or None) source words of each length bucket."""
    bucket_sizes: list[list[int]]
    """Per test set, the sentences in each bucket."""
    signatures: list[dict[str, str]]
    """Per test set, the BLEU and chrF signatures."""
    systems: list[SystemReport]
    bootstrap: dict[str, Any] | None
    speed: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (docs/compare.md describes every key)."""
        return _to_json(self)

    def markdown(self) -> str:
        return _markdown(self)


# --------------------------------------------------------------------------- the comparison


def compare(given: Sequence[str], tests: Sequence[tuple[Path, Path]], options: Options | None = None,
            log: Callable[[str], None] = lambda line: None) -> Report:
    """Compare the systems ``given`` (run directories, checkpoints or hypothesis files) on the
    ``tests`` sets (default: the runs' shared test split). Every input is checked before any
    model is loaded; bad input is a one-line MtkitError naming the file."""
    options = options or Options()
    if not given:
        raise MtkitError("no systems to compare")
    buckets = length_buckets(options.buckets)
    systems = [find_system(name) for name in given]
    test_sets = read_test_sets(tests) if tests else run_test_sets(systems)
    hypotheses: dict[int, list[list[str]]] = {}
    for index, system in enumerate(systems):
        if not system.is_run:
            hypotheses[index] = [_read_hypotheses(hypothesis_file(system, test, len(test_sets)), test)
                                 for test in test_sets]

    reports = []
    lang = options.lang or options.tgt_lang or _run_lang(systems)
    scored: dict[int, list[list[MetricScore]]] = {}
    for index, system in enumerate(systems):
        if system.is_run:
            report, hypotheses[index], scored[index] = _run_system(system, test_sets, options, lang, log)
        else:
            report = SystemReport(system.name, "hypotheses")
        reports.append(report)

    signatures = []
    for t, test in enumerate(test_sets):
        log(f"compare: scoring {test.name}")
        outputs = [hypotheses[i][t] for i in range(len(systems))]
        scores = [scored[i][t] if i in scored else None for i in range(len(systems))]
        signatures.append(_score_test_set(test, reports, outputs, scores, buckets, test.tgt_lang or lang, options))
    bootstrap = None
    if len(systems) > 1:  # sacrebleu seeds its resampling from SACREBLEU_SEED
        bootstrap = {"samples": options.samples, "seed": os.environ.get("SACREBLEU_SEED", "12345")}
    speed = None
    if options.speed_sentences > 0 and any(s.is_run for s in systems):
        batched, singles = speed_samples(test_sets[0].sources, options.speed_sentences)
        speed = {"test_set": test_sets[0].name, "beam": options.speed_beam, "batch_32_sentences": len(batched),
                 "batch_1_sentences": len(singles), "device": options.device, "threads": _threads()}
    sizes = [[len(rows) for rows in _bucket_rows(test.sources, buckets)] for test in test_sets]
    return Report(test_sets, buckets, sizes, signatures, reports, bootstrap, speed)


def _read_hypotheses(path: Path, test: TestSet) -> list[str]:
    if not path.is_file():
        raise MtkitError(f"{path}: no such hypothesis file")
    hyps = read_text(path)
    if len(hyps) != len(test.references):
        raise MtkitError(f"{path} has {len(hyps)} lines but the test set {test.name} ({test.reference}) "
                         f"has {len(test.references)}")
    return hyps


def _run_lang(systems: Sequence[System]) -> str | None:
    """The first run's target language (BLEU's tokenizer follows it), if there is a run."""
    from mtkit.checkpoint import read_checkpoint_config

    runs = [s.checkpoint for s in systems if s.checkpoint is not None]
    return read_checkpoint_config(runs[0]).data.tgt_lang if runs else None


def _run_system(system: System, test_sets: list[TestSet], options: Options, lang: str | None,
                log: Callable[[str], None]):
    """Translate and score every test set with the run's decode settings, then measure it.
    Returns the report, the translations and their BLEU and chrF, per test set."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.engines import open_translator
    from mtkit.evaluate import translate_and_score

    assert system.checkpoint is not None
    loaded = load_for_inference(system.checkpoint, device=options.device)
    config = loaded.config
    # The model as trained, whatever engine the run would translate with: the PyTorch engine at
    # float32, in this process (``measure_decoding`` times it the same way).
    decode = config.decode.model_copy(update={"backend": "torch", "compute_type": "float32"})
    translators: dict[tuple[str | None, str | None], Translator] = {}

    def translator_for(test: TestSet) -> Translator:
        """The run's translator for ``test``'s direction (``--source-lang``/``--target-lang`` first)."""
        languages = (options.src_lang or test.src_lang, options.tgt_lang or test.tgt_lang)
        if languages not in translators:
            try:
                translators[languages] = open_translator(loaded, decode, options.device, say=log,
                                                         src_lang=languages[0], tgt_lang=languages[1])
            except MtkitError as err:  # a multilingual run without its languages: say which run
                raise MtkitError(f"{system.name}: {err}") from None
        return translators[languages]

    for test in test_sets:  # every direction checked before the first is translated
        translator_for(test)
    outputs, scores = [], []
    for test in test_sets:
        log(f"compare: {system.name}: translating {test.name} ({len(test.sources):,} sentences, "
            f"beam {config.decode.beam})")
        found = translate_and_score(translator_for(test), test.sources, test.references, metrics=METRICS,
                                    tgt_lang=test.tgt_lang or lang, tokenize=options.tokenize)
        outputs.append(found.hypotheses)
        scores.append(found.scores)
    report = SystemReport(system.name, "run", str(loaded.path), params=count_parameters(loaded))
    report.updates, report.train_seconds, report.train_tgt_tok_per_s = training_record(loaded.path)
    if options.speed_sentences > 0:
        log(f"compare: {system.name}: timing beam {options.speed_beam} at batch {SPEED_BATCH} and 1")
        report.decode_sent_per_s, report.kv_cache_bytes = measure_decoding(loaded, test_sets[0], options)
    return report, outputs, scores


def _score_test_set(test: TestSet, reports: list[SystemReport], outputs: list[list[str]],
                    scored: list[list[MetricScore] | None], buckets: list[tuple[str, int, int | None]],
                    lang: str | None, options: Options) -> dict[str, str]:
    """Score every system on ``test`` into its report (a run's BLEU and chrF are ``scored``
    already, as it was translated); returns the signatures."""
    refs = [test.references]
    rows = _bucket_rows(test.sources, buckets)
    signatures: dict[str, str] = {}
    for report, hyps, found in zip(reports, outputs, scored, strict=True):
        bleu, chrf = found or score(hyps, refs, METRICS, tgt_lang=lang, tokenize=options.tokenize)
        signatures = {"bleu": bleu.signature, "chrf": chrf.signature}
        by_length = [
            score([hyps[i] for i in chosen], [[test.references[i] for i in chosen]], ("bleu",), tgt_lang=lang,
                  tokenize=options.tokenize)[0].score if chosen else None
            for chosen in rows
        ]
        report.scores.append(Scores(bleu, chrf, bleu.ratio, by_length))
    if len(reports) > 1:
        named = [(report.name, hyps) for report, hyps in zip(reports, outputs, strict=True)]
        result = paired_bootstrap(named, refs, METRICS, tgt_lang=lang, tokenize=options.tokenize,
                                  samples=options.samples)
        # sacrebleu's bootstrap signatures add the resampling (bs:1000|seed:12345).
        signatures = {"bleu": result.signatures["BLEU"], "chrf": result.signatures["chrF2"]}
        for metric, key in (("BLEU", "bleu"), ("chrF2", "chrf")):
            for report, (_, _, mean, ci, p) in zip(reports, result.rows[metric], strict=True):
                assert mean is not None and ci is not None  # the bootstrap gives every system both
                # sacrebleu's numbers are numpy scalars: plain floats for JSON.
                report.scores[-1].bootstrap[key] = Resampled(float(mean), float(ci), None if p is None else float(p))
        for report, hyps in zip(reports[1:], outputs[1:], strict=True):
            report.scores[-1].same_as_baseline = hyps == outputs[0]
    return signatures


def length_buckets(edges: Sequence[int]) -> list[tuple[str, int, int | None]]:
    """``(label, lowest, highest)`` source words per bucket for ascending upper ``edges``
    (the last bucket is open)."""
    if not edges or any(e < 1 for e in edges) or list(edges) != sorted(set(edges)):
        raise MtkitError(f"--buckets {','.join(map(str, edges))}: expected ascending positive word counts")
    buckets: list[tuple[str, int, int | None]] = [(f"≤{edges[0]}", 0, edges[0])]
    for low, high in zip(edges, edges[1:], strict=False):
        buckets.append((f"{low + 1}–{high}", low + 1, high))
    buckets.append((f">{edges[-1]}", edges[-1] + 1, None))
    return buckets


def _bucket_rows(sources: list[str], buckets: list[tuple[str, int, int | None]]) -> list[list[int]]:
    """The line numbers (0-based) of each bucket, by the source's whitespace-separated words."""
    rows: list[list[int]] = [[] for _ in buckets]
    for i, line in enumerate(sources):
        words = len(line.split())
        for b, (_, low, high) in enumerate(buckets):
            if words >= low and (high is None or words <= high):
                rows[b].append(i)
                break
    return rows


# --------------------------------------------------------------------------- what a run records


def count_parameters(loaded: Loaded) -> dict[str, int]:
    """Parameters (shared tensors once): ``embedding`` is the token embeddings and any output
    projection onto a vocabulary (vocabulary-sized matrices); ``other`` is the rest, position
    embeddings included."""
    from torch import nn

    model: nn.Module = loaded.model
    vocab = {loaded.tokenizers.src.vocab_size, loaded.tokenizers.tgt.vocab_size}
    embedding: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and module.out_features in vocab):
            embedding[id(module.weight)] = module.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": sum(embedding.values()), "other": total - sum(embedding.values()), "total": total}


def training_record(checkpoint: Path) -> tuple[int | None, float | None, float | None]:
    """Updates, wall-clock seconds (validation included) and target tokens per second of the
    updates alone, as the checkpoint's training state records them up to that checkpoint;
    None where it does not (an averaged checkpoint keeps no training state, and checkpoints
    written before mtkit counted target tokens have no rate)."""
    from mtkit.checkpoint import STATE, load_trainer_state, read_meta

    meta = read_meta(checkpoint)
    updates = meta.get("step")
    if STATE not in meta.get("files", {}):
        return updates, None, None
    state = load_trainer_state(checkpoint).get("state") or {}
    seconds = state.get("elapsed_s") or None
    tokens, update_s = state.get("target_tokens", 0), state.get("update_s", 0.0)
    rate = tokens / update_s if tokens and update_s else None
    return updates, seconds, rate


# --------------------------------------------------------------------------- speed and memory


def speed_samples(sources: list[str], count: int) -> tuple[list[str], list[str]]:
    """The lines timed at batch 32: up to ``count`` non-empty lines spread evenly over
    ``sources`` (so their lengths are the test set's); and those timed at batch 1: every
    fourth of them, still spread over the test set."""
    lines = [line for line in sources if line.strip()]
    if len(lines) > count:
        lines = [lines[i * len(lines) // count] for i in range(count)]
    return lines, lines[::4]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def measure_decoding(loaded: Loaded, test: TestSet,
                     options: Options) -> tuple[dict[str, float] | None, float | None]:
    """Sentences per second at batch 32 and batch 1 (beam ``options.speed_beam``, text in,
    text out) on a sample of ``test``'s sources, and the mean key/value-cache bytes per sentence."""
    from mtkit.config import DecodeConfig
    from mtkit.engines import open_translator

    decode = DecodeConfig.model_validate({**loaded.config.decode.model_dump(), "beam": options.speed_beam,
                                          "nbest": 1, "sampling": False, "batch_tokens": _ONE_BATCH,
                                          "batch_sentences": _ONE_BATCH, "backend": "torch",
                                          "compute_type": "float32"})
    translator = open_translator(loaded, decode, options.device, warn=lambda message: None,
                                 src_lang=options.src_lang or test.src_lang, tgt_lang=options.tgt_lang or test.tgt_lang)
    sample, singles = speed_samples(test.sources, options.speed_sentences)
    if not sample:
        return None, None
    # Batches of similar lengths, as a translator that sorts its input by length makes them.
    lengths = [len(ids) for ids in loaded.tokenizers.encode_source(sample)]
    by_length = [line for _, line in sorted(zip(lengths, sample, strict=True), key=lambda pair: pair[0])]
    batches = [by_length[i : i + SPEED_BATCH] for i in range(0, len(by_length), SPEED_BATCH)]
    # Untimed first: the longest batch and one line, so that first-call set-up and the first
    # touch of fresh memory are not counted against the first system compared.
    translator.translate_lines(batches[-1])
    translator.translate_lines(singles[:1])
    batched, _ = _sentences_per_second(translator, batches)
    alone, outputs = _sentences_per_second(translator, [[line] for line in singles])
    speed = {f"batch_{SPEED_BATCH}": batched, "batch_1": alone}
    return speed, kv_cache_bytes(loaded, translator, singles, outputs)


def _sentences_per_second(translator: Translator, batches: list[list[str]]) -> tuple[float, list[str]]:
    """Translate ``batches`` one call each; sentences per second and the translations."""
    outputs: list[str] = []
    started = time.perf_counter()
    for batch in batches:
        outputs.extend(t.text for t in translator.translate_lines(batch))
    seconds = max(time.perf_counter() - started, 1e-9)
    return len(outputs) / seconds, outputs


def kv_cache_bytes(loaded: Loaded, translator: Translator, sources: list[str], outputs: list[str]) -> float | None:
    """Mean bytes of the decoder state once a sentence's translation has been decoded, for one
    hypothesis: ``model.encode`` of the source, then ``decode_step`` of BOS and each output
    token, as search feeds them; then the state's ``nbytes``. Beam search holds one such state
    per beam."""
    import torch

    from mtkit.vocab import BOS_ID, EOS_ID

    model, device = loaded.model, translator.device
    sizes = []
    with torch.inference_mode():
        for source, output in zip(sources, outputs, strict=True):
            # A multilingual model's language tokens (a language model's prompt) as the translator adds them.
            framed = loaded.tokenizers.encode_source([source])[0]
            src_ids = [*translator.source_prefix, *framed[: translator.max_source], EOS_ID]
            src = torch.tensor([src_ids], device=device)
            tgt_ids = [BOS_ID, *translator.target_prefix,
                       *loaded.tokenizers.tgt.encode([output])[0]][: int(model.positions_left(src)[0])]
            # The model's own state type (as in search), which its decode_step takes.
            state: Any = model.encode(src)
            for token in tgt_ids:
                model.decode_step(torch.tensor([[token]], device=device), state)
            sizes.append(state.nbytes)
    return sum(sizes) / len(sizes) if sizes else None


# --------------------------------------------------------------------------- rendering


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _to_json(report: Report) -> dict[str, Any]:
    test_sets = [
        {"name": test.name, "source": test.source, "reference": test.reference, "sentences": len(test.references),
         "bleu_signature": signatures["bleu"], "chrf_signature": signatures["chrf"],
         "buckets": [{"label": label, "min_words": low, "max_words": high, "sentences": size}
                     for (label, low, high), size in zip(report.buckets, sizes, strict=True)]}
        for test, signatures, sizes in zip(report.test_sets, report.signatures, report.bucket_sizes, strict=True)
    ]
    systems = []
    for system in report.systems:
        tests = []
        for test, s in zip(report.test_sets, system.scores, strict=True):
            row: dict[str, Any] = {"test": test.name}
            for key, metric in (("bleu", s.bleu), ("chrf", s.chrf)):
                resampled = s.bootstrap.get(key)
                row[key] = round(metric.score, 4)
                row[f"{key}_mean"] = None if resampled is None else round(resampled.mean, 4)
                row[f"{key}_ci"] = None if resampled is None else round(resampled.ci, 4)
                row["p_value" if key == "bleu" else "chrf_p_value"] = None if resampled is None else resampled.p_value
            row.update(same_as_baseline=s.same_as_baseline, length_ratio=_round(s.length_ratio, 4),
                       bleu_by_length=[_round(b, 4) for b in s.bleu_by_length])
            tests.append(row)
        first = tests[0]
        systems.append({
            "name": system.name, "kind": system.kind, "checkpoint": system.checkpoint,
            # The first test set's scores, repeated at the top for the common one-set case.
            "bleu": first["bleu"], "chrf": first["chrf"], "p_value": first["p_value"],
            "chrf_p_value": first["chrf_p_value"],
            "params": system.params, "updates": system.updates, "train_seconds": _round(system.train_seconds, 3),
            "train_tgt_tok_per_s": _round(system.train_tgt_tok_per_s, 1),
            "decode_sent_per_s": None if system.decode_sent_per_s is None else {
                k: round(v, 3) for k, v in system.decode_sent_per_s.items()},
            "kv_cache_bytes_per_sentence": _round(system.kv_cache_bytes, 0),
            "tests": tests,
        })
    return {"format": FORMAT, "test_sets": test_sets, "bootstrap": report.bootstrap, "speed": report.speed,
            "systems": systems}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table padded to aligned columns; the first column left, the rest right."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths,
                                                                                              strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if c == 0 else "-" * (w + 1) + ":" for c, w in enumerate(widths)) + "|"
    return [line(header), rule, *[line(row) for row in rows]]


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" + (" *" if value < 0.05 else "")


def _count(value: int) -> str:
    """``7.58M``, ``175.4k``, ``960``."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else str(value)


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _markdown(report: Report) -> str:
    out = ["# mtkit compare", ""]
    baseline = report.systems[0].name
    paired = report.bootstrap is not None
    for t, test in enumerate(report.test_sets):
        out += [f"## {test.name} ({len(test.references):,} sentences)", ""]
        if test.source == test.reference:
            out += [f"The runs' test split: `{test.source}`", ""]
        else:
            out += [f"Source `{test.source}`, reference `{test.reference}`", ""]
        header = ["system", "BLEU", "chrF", "len ratio"]
        if paired:
            header = ["system", "BLEU", "mean ± 95% CI", "p", "chrF", "mean ± 95% CI", "p", "len ratio"]
        rows = []
        for i, system in enumerate(report.systems):
            s = system.scores[t]
            name = f"{system.name} (baseline)" if i == 0 and paired else system.name
            ratio = _num(s.length_ratio, 3)
            if paired:
                row = [name]
                for metric, key in ((s.bleu, "bleu"), (s.chrf, "chrf")):
                    resampled = s.bootstrap[key]
                    # sacrebleu counts no resample as "at least as large" as a zero difference.
                    p = "same output" if s.same_as_baseline else _p(resampled.p_value)
                    row += [_num(metric.score), f"{_num(resampled.mean)} ± {_num(resampled.ci)}", p]
                rows.append([*row, ratio])
            else:
                rows.append([name, _num(s.bleu.score), _num(s.chrf.score), ratio])
        out += _table(header, rows)
        signatures = report.signatures[t]
        out += ["", f"BLEU: `{signatures['bleu']}`  ", f"chrF: `{signatures['chrf']}`", ""]
        if paired:
            assert report.bootstrap is not None
            out += [f"Paired bootstrap resampling against {baseline} (sacrebleu, {report.bootstrap['samples']:,} "
                    f"resamples, seed {report.bootstrap['seed']}): the bootstrap mean with the half-width of its 95% "
                    "interval; p is the chance of a difference at least this large if the systems were equally "
                    "good; * p < 0.05.", ""]
        sizes = report.bucket_sizes[t]
        kept = [b for b, size in enumerate(sizes) if size]
        out += ["BLEU by source length (words; n sentences):", ""]
        header = ["system", *[f"{report.buckets[b][0]} (n={sizes[b]:,})" for b in kept]]
        rows = [[system.name, *[_num(system.scores[t].bleu_by_length[b]) for b in kept]] for system in report.systems]
        out += _table(header, rows) + [""]
    if any(system.kind == "run" for system in report.systems):
        out += _systems_markdown(report)
    return "\n".join(out) + "\n"


def _systems_markdown(report: Report) -> list[str]:
    batch = f"batch_{SPEED_BATCH}"
    header = ["system", "params (embedding + other)", "updates", "train time", "train tgt tok/s",
              f"sent/s batch {SPEED_BATCH}", "sent/s batch 1", "KV cache / sentence"]
    rows = []
    for system in report.systems:
        p = system.params
        params = "–" if p is None else (
            f"{_count(p['total'])} ({_count(p['embedding'])} + {_count(p['other'])})")
        speed = system.decode_sent_per_s or {}
        rows.append([system.name, params, _num(system.updates, 0), _duration(system.train_seconds),
                     _num(system.train_tgt_tok_per_s, 0), _num(speed.get(batch), 1), _num(speed.get("batch_1"), 1),
                     _bytes(system.kv_cache_bytes)])
    out = ["## Systems", "", *_table(header, rows), ""]
    notes = ["Training figures are those recorded in each checkpoint, up to that checkpoint: updates, wall-clock "
             "time (validation included) and target tokens per second of the updates alone."]
    if report.speed is not None:
        s = report.speed
        threads = f"{s['threads']} thread" + ("s" if s["threads"] != 1 else "")
        notes.append(
            f"Decoding: beam {s['beam']}, text in and text out, on {s['device']} with {threads}, one "
            f"system after another in this process: {s['batch_32_sentences']:,} sentences of {s['test_set']} "
            f"(spread over it, sorted by length) at batch {SPEED_BATCH}, {s['batch_1_sentences']:,} of them at "
            "batch 1.")
        notes.append("KV cache: the decoder state's bytes once one hypothesis of a sentence is decoded, mean over "
                     "the batch-1 sentences; beam search keeps one per beam.")
    notes.append("–: does not apply, or not recorded (hypothesis files have no model).")
    return out + [f"- {note}" for note in notes] + [""]

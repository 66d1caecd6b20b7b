#!/usr/bin/env python
"""``mtkit serve`` under load: dynamic batching against one request at a time.

    .venv/bin/python scripts/bench/bench_serve.py [--run RUN] [--clients 16] [--seconds 30] [--device cuda] [--json]

Starts ``mtkit serve -m RUN`` as a subprocess on a free 127.0.0.1 port and runs ``--clients``
concurrent HTTP clients (threads, one ``httpx.Client`` each) against it for ``--seconds``
(after ``--warmup`` seconds that are not counted, and at most ``--max-requests`` requests);
and the same load, the same requests in the same order, against a second server started
with ``--no-batching`` (one request at a time, as LibreTranslate does). The two take turns
in ``--rounds`` rounds (batched, unbatched, unbatched, batched, ...), so that a change in
the machine's load hits both alike. Every client sends
``POST /translate`` with a JSON body; about 70% of the texts are one sentence, the others
3 to 8 sentences on separate lines (sentences from the Multi30k test set when
``../shared`` has it, else generated words).

Each response is checked against the same text translated offline in this process with
mtkit's ``Translator`` (same checkpoint, the run's decode settings, each line alone: batch
1), line by line. A line that differs is *noise* when it is a near-tie that batching may
legitimately flip (padding changes the float sums): it equals the offline translation of
all sentences in one batch, or its batch-1 forced score is within ``--tie`` of the batch-1
best. Otherwise the response is *mismatched* (printed to stderr with both texts). Reported
per mode: requests/s, p50/p90/p99 latency, ``errors`` (HTTP status other than 200),
``lost`` (no HTTP response: connection error or client timeout), ``mismatched``, the
exact-match rate against batch 1, and the server's resident memory (psutil, the process and
its children): ``rss_growth_pct`` compares the peak over the first and the last fifth of
the measured time. The server's behaviour under faults (bad requests, clients that go away,
SIGTERM with requests in flight) is tests/test_serve.py's to check, not this benchmark's.

Top-level keys: ``speedup_batched`` (batched requests/s over unbatched), ``errors``, ``lost``
and ``mismatched`` (summed over both modes), ``p50_ms``, ``p99_ms`` and ``rss_growth_pct``
(the batched server's), then ``batched`` and ``unbatched`` (the per-mode details) and
``settings`` (with ``offline_ms_per_sentence_by_batch``: what batching gains in this
process, without HTTP, on this machine: how much of the speedup the model allows). The
clients run on the same cores as the server, in both modes alike. Without ``--json``: a
table, one row per mode.

Without ``--run``: with Multi30k in ``../shared``, ``configs/tiny.yaml`` trained (300 steps, at
most ``--minutes``) into ``runs/bench_serve`` (reused when it has a checkpoint); without it, a
random-weight ``tiny`` model on generated text in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from benchlib import (
    MTKIT,
    MULTI30K,
    ROOT,
    RssSampler,
    made_up_words,
    print_result,
    save_random_checkpoint,
    train_with_cli,
)

from mtkit.checkpoint import Loaded, load_for_inference
from mtkit.config import DecodeConfig
from mtkit.engines import open_translator
from mtkit.fileio import read_lines
from mtkit.search import length_penalty
from mtkit.translate import Translator
from mtkit.vocab import BOS_ID, EOS_ID

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- the model


def train_quick_model(run_dir: Path, minutes: float) -> None:
    """``configs/tiny.yaml`` (3,000 Multi30k pairs) trained through the CLI for its 300 steps
    (about 4 minutes on 2 busy cores) or ``minutes``. After 100 steps most sentences still
    translate alike ("Ein Mann mit einem."), which would blunt the check for swapped
    responses; after 300, 100 test sentences give 100 distinct translations of realistic
    length (9.6 words for 11.9)."""
    train_with_cli(ROOT / "configs" / "tiny.yaml", [f"experiment.dir={run_dir}", f"train.max_minutes={minutes}"],
                   timeout=60 * (minutes + 5))


def random_run(workdir: Path) -> Path:
    """A random-weight ``tiny`` model on a SentencePiece model of generated text (no data
    needed). Its outputs run to the maximum length: long, equal work per sentence."""
    from mtkit.config import validate_config
    from mtkit.corpus import training_text
    from mtkit.tokenizer import train_tokenizers

    rng = random.Random(0)
    text = workdir / "text.txt"
    text.write_text("".join(generated_sentence(rng) + "\n" for _ in range(2000)), encoding="utf-8")
    config = validate_config({
        "experiment": {"dir": str(workdir / "random")},
        "data": {"train": {"src": str(text), "tgt": str(text)}},
        "tokenizer": {"vocab_size": 200, "num_threads": 1},
        "model": {"size": "tiny", "dropout": 0.0},
        "decode": {"beam": 4, "max_len_a": 1.0, "max_len_b": 5},
    })
    tokenizers = train_tokenizers(config.tokenizer, workdir / "tokenizer",
                                  lambda sides: training_text(config.data, sides))
    return save_random_checkpoint(config, tokenizers, workdir / "random")


def generated_sentence(rng: random.Random) -> str:
    return " ".join(made_up_words(rng, rng.randint(3, 14))).capitalize() + "."


# --------------------------------------------------------------------------- the texts


def sentence_pool(source: Path | None, size: int, seed: int) -> list[str]:
    """``size`` distinct one-sentence lines (Multi30k test, else generated), shuffled."""
    from mtkit.serve import split_text

    rng = random.Random(seed)
    if source is not None and source.exists():
        lines = sorted({line.strip() for line in read_lines(source) if line and line.strip()})
    else:
        lines = sorted({generated_sentence(rng) for _ in range(size)})
    rng.shuffle(lines)
    # The server cuts a line into sentences; one sentence a line keeps the reference (each
    # line translated alone) what the server computes.
    return [line for line in lines if len(split_text(line).sentences) == 1][:size]


def request_texts(pool: list[str], count: int, long_share: float, seed: int) -> list[str]:
    """``count`` request texts: one sentence, or (with probability ``long_share``) 3 to 8
    sentences on separate lines (the server translates line by line: the contract)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        lines = rng.randint(3, 8) if rng.random() < long_share else 1
        texts.append("\n".join(rng.sample(pool, lines)))
    return texts


# --------------------------------------------------------------------------- offline reference


class Reference:
    """Offline translations of every pool sentence, and the judge of a served translation."""

    def __init__(self, loaded: Loaded, decode: DecodeConfig, pool: list[str], tie: float):
        self.loaded = loaded
        self.decode = decode
        self.tie = tie
        self.device = next(loaded.model.parameters()).device
        # The translator that the server opens under the same decode settings.
        translator = open_translator(loaded, decode, self.device,
                                     say=lambda line: print(f"offline reference: {line}", file=sys.stderr),
                                     warn=lambda _: None)
        with torch.inference_mode():
            self.alone = {s: t for s in pool for t in [translator.translate_lines([s])[0]]}
            together = translator.translate_lines(pool)
        self.batched = {s: t.text for s, t in zip(pool, together, strict=True)}
        self.batch_sensitive = sum(self.alone[s].text != self.batched[s] for s in pool)
        self.scaling = batch_scaling(translator, pool)

    def expected(self, text: str) -> str:
        return "\n".join(self.alone[line].text for line in text.split("\n"))

    def judge(self, text: str, served: str) -> tuple[str, list[dict[str, Any]]]:
        """"exact", "noise" (only near-ties differ) or "mismatched", with the differing lines."""
        sources, got = text.split("\n"), served.split("\n")
        if len(got) != len(sources):
            return "mismatched", [{"reason": f"{len(got)} lines for {len(sources)}", "served": served}]
        diffs = []
        for source, line in zip(sources, got, strict=True):
            best = self.alone[source]
            if line == best.text:
                continue
            forced = self.forced_score(source, line)
            near = best.score is not None and forced is not None and abs(forced - best.score) <= self.tie
            noise = line == self.batched[source] or near
            diffs.append({"source": source, "served": line, "offline": best.text, "noise": noise,
                          "offline_score": best.score, "served_forced_score": forced})
        if not diffs:
            return "exact", []
        return ("noise" if all(d["noise"] for d in diffs) else "mismatched"), diffs

    def forced_score(self, source: str, target: str) -> float | None:
        """The length-penalised log-probability that the search would give ``target`` (its
        SentencePiece re-encoding) as the translation of ``source``, at batch 1."""
        tok, model = self.loaded.tokenizers, self.loaded.model
        src_ids = tok.src.encode([source])[0][: model.cfg.max_positions - 1]
        tgt_ids = tok.tgt.encode([target])[0]
        if not src_ids or len(tgt_ids) + 1 > model.cfg.max_positions:
            return None
        src = torch.tensor([[*src_ids, EOS_ID]], device=self.device)
        tgt_in = torch.tensor([[BOS_ID, *tgt_ids]], device=self.device)
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1)[0]
        gold = torch.tensor([*tgt_ids, EOS_ID], device=self.device)
        total = log_probs.gather(1, gold[:, None]).sum().item()
        return total / length_penalty(len(tgt_ids) + 1.0, self.decode.lenpen, self.decode.length_penalty_form)


def batch_scaling(translator: Translator, pool: list[str], sentences: int = 64) -> dict[int, float]:
    """Milliseconds per sentence when ``translate_lines`` gets batches of 1, 2, 4, ... 64 of
    the first ``sentences`` pool sentences, in this process: the most any batching can gain
    on this machine with this model (the server adds HTTP and queueing on top)."""
    lines = pool[:sentences]
    scaling = {}
    with torch.inference_mode():
        for size in (1, 2, 4, 8, 16, 32, 64):
            started = time.perf_counter()
            for i in range(0, len(lines), size):
                translator.translate_lines(lines[i : i + size])
            scaling[size] = round(1000 * (time.perf_counter() - started) / len(lines), 2)
    return scaling


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    ready_s: float
    returncode: int | None = None
    stop_s: float | None = None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""
        if self.returncode is not None:
            return
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.returncode = self.process.returncode
        self.stop_s = round(time.monotonic() - started, 2)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def serving(run: Path, extra: list[str], logdir: Path, name: str, startup: float,
            mtkit: list[str] = MTKIT) -> Iterator[Server]:
    """``mtkit serve -m run`` on a free port, ready (``/health`` 200) when entered; always
    stopped (SIGTERM, then kill) when left, whatever happened."""
    port = free_port()
    log = logdir / f"{name}.log"
    command = [*mtkit, "serve", "-m", str(run), "--host", HOST, "--port", str(port), *extra]
    started = time.monotonic()
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)  # a Ctrl-C here reaches it through stop()
    server = Server(process, f"http://{HOST}:{port}", log, 0.0)
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"{name}: mtkit serve exited with {process.returncode}:\n{server.log_tail()}")
                if time.monotonic() - started > startup:
                    raise SystemExit(f"{name}: not ready after {startup:.0f} s:\n{server.log_tail()}")
                try:
                    if client.get(f"{server.url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        server.ready_s = round(time.monotonic() - started, 2)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    index: int
    started: float  # monotonic seconds
    latency: float
    status: int | None  # None: no HTTP response
    body: Any = None
    error: str | None = None


@dataclass
class Load:
    """Hand out request indices (the same sequence in every mode) until the deadline or the
    count runs out."""

    texts: list[str]
    deadline: float
    limit: int
    next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        with self.lock:
            if time.monotonic() >= self.deadline or self.next >= self.limit:
                return None
            self.next += 1
            return self.next - 1


def translate_body(text: str | list[str], source: str, target: str) -> dict[str, Any]:
    return {"q": text, "source": source, "target": target, "format": "text"}


def run_clients(url: str, load: Load, clients: int, langs: tuple[str, str], timeout: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client_loop() -> None:
        mine = []
        with httpx.Client(timeout=timeout) as client:
            while (index := load.take()) is not None:
                body = translate_body(load.texts[index % len(load.texts)], *langs)
                started = time.monotonic()
                try:
                    response = client.post(f"{url}/translate", json=body)
                    status, error = response.status_code, None
                    try:
                        payload = response.json()
                    except ValueError:
                        payload, error = None, f"not JSON: {response.text[:200]!r}"
                except httpx.HTTPError as err:
                    status, payload, error = None, None, f"{type(err).__name__}: {err}"
                mine.append(Outcome(index, started, time.monotonic() - started, status, payload, error))
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(load.deadline - time.monotonic(), 0) + timeout + 10)
    if any(thread.is_alive() for thread in threads):
        print("warning: a client thread did not finish in time; its requests count as lost", file=sys.stderr)
    return sorted(outcomes, key=lambda o: o.index)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


@dataclass
class Mode:
    """One server under test and what its rounds of load collected."""

    name: str
    server: Server
    rss: RssSampler
    outcomes: list[Outcome] = field(default_factory=list)
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (begin, end), monotonic
    sent: int = 0
    before: dict[str, int] = field(default_factory=dict)


def warm_up(mode: Mode, texts: list[str], args: argparse.Namespace, langs: tuple[str, str]) -> None:
    """Load that is not counted (first-call allocations, lazy initialisation)."""
    warm = Load(texts, time.monotonic() + args.warmup, args.max_requests)
    run_clients(mode.server.url, warm, args.clients, langs, args.request_timeout)
    mode.before = _stats(mode.server.url)


def load_round(mode: Mode, texts: list[str], seconds: float, args: argparse.Namespace,
               langs: tuple[str, str]) -> None:
    """``seconds`` of load, continuing the mode's request sequence where its last round ended."""
    begin = time.monotonic()
    load = Load(texts, begin + seconds, args.max_requests, next=mode.sent)
    mode.outcomes += run_clients(mode.server.url, load, args.clients, langs, args.request_timeout)
    mode.rounds.append((begin, time.monotonic()))
    mode.sent = load.next


def evaluate(mode: Mode, texts: list[str], reference: Reference) -> dict[str, Any]:
    """The mode's figures; every response judged against the reference."""
    server, outcomes, rss = mode.server, sorted(mode.outcomes, key=lambda o: o.index), mode.rss
    after = _stats(server.url)
    before = mode.before
    counters = ("requests", "sentences", "batches", "dropped_sentences", "rejected", "timeouts")
    engine: dict[str, Any] = {k: after[k] - before.get(k, 0) for k in counters if k in after}
    if engine.get("batches"):
        engine["sentences_per_batch"] = round(engine["sentences"] / engine["batches"], 2)
    engine["largest_batch"] = after.get("largest_batch")
    sent = mode.sent
    answered = {o.index for o in outcomes}
    ok = [o for o in outcomes if o.status == 200 and o.error is None]
    verdicts: Counter[str] = Counter()
    mismatches, noise_lines = [], 0
    for o in ok:
        text = texts[o.index % len(texts)]
        served = o.body.get("translatedText") if isinstance(o.body, dict) else None
        if not isinstance(served, str):
            verdicts["mismatched"] += 1
            mismatches.append({"index": o.index, "reason": "no translatedText string", "body": o.body})
            continue
        verdict, diffs = reference.judge(text, served)
        verdicts[verdict] += 1
        noise_lines += sum(d.get("noise", False) for d in diffs)
        if verdict == "mismatched":
            mismatches.append({"index": o.index, "diffs": diffs})
    errors = [o for o in outcomes if o.status is not None and (o.status != 200 or o.error is not None)]
    lost = [o for o in outcomes if o.status is None]
    lost_count = len(lost) + sum(1 for i in range(sent) if i not in answered)
    lines = sum(texts[o.index % len(texts)].count("\n") + 1 for o in ok)
    latencies = [o.latency * 1000 for o in ok]
    span = sum(e - b for b, e in mode.rounds)
    fifth = span / 5  # within the first and the last round (at most 5 rounds)
    first = rss.window_peak(mode.rounds[0][0], mode.rounds[0][0] + fifth)
    last = rss.window_peak(mode.rounds[-1][1] - fifth, mode.rounds[-1][1])
    result: dict[str, Any] = {
        "requests": sent,
        "ok": len(ok),
        "seconds": round(span, 2),
        "requests_per_s": round(len(ok) / span, 2),
        "per_round_requests_per_s": [
            round(sum(1 for o in ok if b <= o.started <= e) / (e - b), 2) for b, e in mode.rounds],
        "lines_per_s": round(lines / span, 2),
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p90_ms": round(percentile(latencies, 90), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "max_ms": round(max(latencies), 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "errors": len(errors),
        "lost": lost_count,
        "mismatched": verdicts["mismatched"],
        "exact": verdicts["exact"],
        "noise": verdicts["noise"],
        "noise_lines": noise_lines,
        "exact_match_rate": round(verdicts["exact"] / len(ok), 4) if ok else None,
        "status_counts": dict(Counter(str(o.status) for o in outcomes)),
        "rss_first_mib": round(first, 1),
        "rss_last_mib": round(last, 1),
        "rss_peak_mib": round(rss.peak(), 1),
        "rss_growth_pct": round(100 * (last - first) / first, 2),
        "ready_s": server.ready_s,
        "engine": engine,
    }
    for o in (errors + lost)[:5]:
        print(f"  error/lost request {o.index}: status {o.status} {o.error or o.body}", file=sys.stderr)
    for m in mismatches[:5]:
        print(f"  mismatched request {m['index']}: {json.dumps(m, ensure_ascii=False)[:800]}", file=sys.stderr)
    result["mismatch_examples"] = mismatches[:3]
    return result


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="Run or checkpoint directory to serve (default: see above).")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="Training budget of the default model (tiny.yaml stops at step 300 before).")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Measured load per mode, in all rounds.")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 6), metavar="1..5",
                        help="The modes take turns this many times.")
    parser.add_argument("--warmup", type=float, default=5.0, help="Load before measuring (not counted).")
    parser.add_argument("--max-requests", type=int, default=5000, help="At most this many requests per mode.")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="Client timeout per request, s.")
    parser.add_argument("--pool", type=int, default=300, help="Distinct sentences the texts are made of.")
    parser.add_argument("--long-share", type=float, default=0.3, help="Share of multi-line texts.")
    parser.add_argument("--tie", type=float, default=1e-3,
                        help="A differing line within this of the batch-1 best score is batching noise.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of the offline reference (1: no OpenMP waits on a busy machine).")
    parser.add_argument("--backend", choices=["auto", "torch", "ctranslate2"], default="auto",
                        help="decode.backend of the servers and of the offline reference.")
    parser.add_argument("--device", default="cpu",
                        help="Where the server and the offline reference translate: cpu, cuda or cuda:N.")
    parser.add_argument("--server-args", default="", help="Extra `mtkit serve` options, e.g. '--max-wait-ms 20'.")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--mtkit", help="The command that runs mtkit (default: this Python's `-m mtkit`), "
                                        "e.g. another checkout's or a patched engine's, to compare.")
    parser.add_argument("--char-limit", type=int, default=5000, help="The server's --char-limit.")
    parser.add_argument("--only", choices=["batched", "unbatched"], help="Run one mode only.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        workdir = Path(tmp)
        run = args.run
        data = MULTI30K / "test_2016_flickr.en.gz"
        if run is None:
            if data.exists():
                run = ROOT / "runs" / "bench_serve"
                if not (run / "checkpoints" / "last").exists():
                    print(f"training configs/tiny.yaml for {args.minutes} min into {run}", file=sys.stderr)
                    train_quick_model(run, args.minutes)
            else:
                run = random_run(workdir)
        loaded = load_for_inference(run, args.device)
        decode = loaded.config.decode.model_copy(update={"nbest": 1, "backend": args.backend})
        langs = (loaded.config.data.src_lang, loaded.config.data.tgt_lang)
        pool = sentence_pool(data if data.exists() else None, args.pool, args.seed)
        texts = request_texts(pool, max(args.max_requests, 1), args.long_share, args.seed + 1)

        started = time.monotonic()
        reference = Reference(loaded, decode, pool, args.tie)
        offline_s = time.monotonic() - started
        print(f"offline reference: {len(pool)} sentences in {offline_s:.1f} s "
              f"({reference.batch_sensitive} differ between batch 1 and one batch)", file=sys.stderr)

        extra = [*args.server_args.split(), "--char-limit", str(args.char_limit), "--device", args.device,
                 "--set", f"decode.backend={args.backend}"]
        options = {"batched": extra, "unbatched": ["--no-batching", *extra]}
        results: dict[str, dict[str, Any]] = {}
        with ExitStack() as stack:
            modes = []
            for name, opts in options.items():
                if args.only in (None, name):
                    server = stack.enter_context(serving(run, opts, workdir, name, args.startup_timeout,
                                                         args.mtkit.split() if args.mtkit else MTKIT))
                    modes.append(Mode(name, server, stack.enter_context(RssSampler(server.process.pid))))
            for mode in modes:
                warm_up(mode, texts, args, langs)
            # The modes take turns (in rotating order), so that a change in the machine's load
            # hits them alike; the idle server costs nothing meanwhile.
            for index in range(args.rounds):
                for mode in modes[index % len(modes) :] + modes[: index % len(modes)]:
                    load_round(mode, texts, args.seconds / args.rounds, args, langs)
            for mode in modes:
                server = mode.server
                models = _info(server.url).get("models")
                served_decode = models[0].get("decode") if isinstance(models, list) and models else None
                result = evaluate(mode, texts, reference)
                result["served_decode_matches"] = _decode_matches(served_decode, decode)
                server.stop()
                result["exit_code"] = server.returncode
                result["stop_s"] = server.stop_s
                results[mode.name] = result
                print(f"{mode.name:9s}: {result['requests_per_s']:7.2f} req/s  p50 {result['p50_ms']} ms  "
                      f"p99 {result['p99_ms']} ms  errors {result['errors']}  lost {result['lost']}  "
                      f"mismatched {result['mismatched']}  rss +{result['rss_growth_pct']}%", file=sys.stderr)
                if result["errors"] or result["lost"] or result["mismatched"]:
                    print(f"{mode.name}: server log tail:\n{server.log_tail()}", file=sys.stderr)

    report = summary(results, args, run, decode, reference, offline_s)
    if args.json:
        print_result(report, True)
    else:
        print_table(report)


def _info(url: str) -> dict[str, Any]:
    try:
        body = httpx.get(f"{url}/info", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _stats(url: str) -> dict[str, int]:
    """The engine's counters (``/info``: models[0].stats), empty when it does not say."""
    models = _info(url).get("models")
    stats = models[0].get("stats") if isinstance(models, list) and models and isinstance(models[0], dict) else None
    return {k: v for k, v in stats.items() if isinstance(v, int)} if isinstance(stats, dict) else {}


def _decode_matches(served: Any, decode: DecodeConfig) -> bool | None:
    """Whether the server's decode settings (from /info, when it says) are the reference's."""
    if not isinstance(served, dict):
        return None
    ours = decode.model_dump()
    keys = ("beam", "lenpen", "max_len_a", "max_len_b", "min_len", "sampling")
    return all(served.get(k, ours[k]) == ours[k] for k in keys)


def summary(results: dict[str, dict[str, Any]], args: argparse.Namespace, run: Path, decode: DecodeConfig,
            reference: Reference, offline_s: float) -> dict[str, Any]:
    batched, unbatched = results.get("batched"), results.get("unbatched")
    main_mode = batched or unbatched or {}
    speedup = None
    if batched and unbatched and unbatched["requests_per_s"]:
        speedup = round(batched["requests_per_s"] / unbatched["requests_per_s"], 2)
    total = lambda key: sum(r[key] for r in results.values())  # noqa: E731
    return {
        "speedup_batched": speedup,
        "errors": total("errors"),
        "mismatched": total("mismatched"),
        "lost": total("lost"),
        "p50_ms": main_mode.get("p50_ms"),
        "p99_ms": main_mode.get("p99_ms"),
        "rss_growth_pct": main_mode.get("rss_growth_pct"),
        "requests_per_s": main_mode.get("requests_per_s"),
        "exact_match_rate": main_mode.get("exact_match_rate"),
        **results,
        "settings": {
            "run": str(run), "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
            "rounds": args.rounds, "max_requests": args.max_requests, "pool": args.pool, "long_share": args.long_share,
            "tie": args.tie, "server_args": args.server_args, "mtkit": args.mtkit, "decode": asdict_decode(decode),
            "offline_batch_sensitive": reference.batch_sensitive, "offline_s": round(offline_s, 1),
            # Responses swapped between two requests go unnoticed only where two sentences
            # translate alike: the closer this is to the pool size, the sharper the check.
            "offline_distinct_translations": len({t.text for t in reference.alone.values()}),
            "offline_ms_per_sentence_by_batch": reference.scaling,
            "device": args.device,
            "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
            "torch": torch.__version__, "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }


def print_table(report: dict[str, Any]) -> None:
    columns = {"req/s": "requests_per_s", "p50 ms": "p50_ms", "p90 ms": "p90_ms", "p99 ms": "p99_ms",
               "errors": "errors", "lost": "lost", "mismatched": "mismatched", "exact": "exact_match_rate",
               "rss +%": "rss_growth_pct"}
    print(f"{'mode':9s} " + " ".join(f"{c:>10s}" for c in columns) + f" {'sent/batch':>10s}")
    for mode in ("batched", "unbatched"):
        if mode in report:
            row = report[mode]
            print(f"{mode:9s} " + " ".join(f"{row[c]!s:>10s}" for c in columns.values())
                  + f" {row['engine'].get('sentences_per_batch', '-')!s:>10s}")
    print(f"speedup_batched {report['speedup_batched']}")
    print("settings: " + json.dumps(report["settings"]))


def asdict_decode(decode: DecodeConfig) -> dict[str, Any]:
    keys = ("beam", "lenpen", "max_len_a", "max_len_b", "min_len", "batch_tokens")
    return {k: v for k, v in decode.model_dump().items() if k in keys}


if __name__ == "__main__":
    main()

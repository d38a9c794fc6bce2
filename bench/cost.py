"""What the cost estimate costs: per line on top of the bare parse loop, and exact token counting's speed.

Runs in one child process (``kind: "cost"``), all variants interleaved round by round on the same
generated chat requests (so slow spells of a shared host hit them alike), best round kept:

* the bare orjson parse loop (the submit prep target's baseline);
* a typed msgspec decode of the fields validation reads (prepare's fast-path shape), and the same naming
  the output-cap fields too, with the cap summed (the estimate's cost on that path);
* + reading each line's output cap into local sums (the least any estimate must do per line);
* + the whole default estimate inlined as a hot loop would (cap sums, 1 line in 32 sampled);
* + :meth:`ChunkTally.add` per line, default sampled counting (1 line in 32);
* + the same with the heuristic counted on every line, and with exact counting on every line.

Then the exact counter's throughput on the requests' texts and on a multilingual set (tokens/s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench import gen
from bench.report import Row

CHAT = "/v1/chat/completions"
BARE = "bare orjson parse loop"


def _loops(lines: list[bytes]) -> dict[str, Callable[[], int]]:
    from airflow_openai_batch.core.cost import CostEstimator, output_cap_of_struct, output_cap_reader

    loads = orjson.loads
    cap_of = output_cap_reader(CHAT)

    def bare() -> int:
        n = 0
        for line in lines:
            loads(line)
            n += 1
        return n

    def caps_inline() -> int:
        bound = unbounded = 0
        for line in lines:
            cap = cap_of(loads(line)["body"])
            if cap is None:
                unbounded += 1
            else:
                bound += cap
        return bound

    def hot_loop() -> int:
        # The cheapest use, as a hot loop would inline it: the cap into local sums, one line in
        # `sample_every` handed over, the sums once at the end of the chunk.
        estimator = CostEstimator(CHAT)
        chunk = estimator.chunk(0, gen.MODEL)
        cap_of, every, sample = chunk.cap_of, chunk.sample_every, chunk.sample
        bound = unbounded = byte_count = largest = largest_line = 0
        unbounded_lines: list[int] = []
        n = 0
        for line in lines:
            body = loads(line)["body"]
            size = len(line) + 1
            byte_count += size
            cap = cap_of(body)
            if cap is None:
                unbounded += 1
                if len(unbounded_lines) < 10:
                    unbounded_lines.append(n + 1)
            else:
                bound += cap
            if size > largest:
                largest, largest_line = size, n + 1
            if not n % every:
                sample(n + 1, size, body)
            n += 1
        chunk.add_summary(n, byte_count, bound, unbounded, unbounded_lines, (largest, largest_line))
        return estimator.finish().input_tokens

    def tally(count: str) -> Callable[[], int]:
        def run() -> int:
            estimator = CostEstimator(CHAT, count=count)
            chunk = estimator.chunk(0, gen.MODEL)
            add = chunk.add
            for n, line in enumerate(lines, 1):
                add(n, len(line) + 1, loads(line)["body"])
            return estimator.finish().input_tokens

        return run

    typed_plain, typed_caps = _typed_decoders()
    cap_of_struct = output_cap_of_struct(CHAT)

    def typed() -> int:
        # The shape of prepare's fast path: a typed decode that names a few fields and skips the rest.
        n = 0
        for line in lines:
            typed_plain(line)
            n += 1
        return n

    def typed_with_caps() -> int:
        bound = unbounded = 0
        for line in lines:
            cap = cap_of_struct(typed_caps(line).body)
            if cap is None:
                unbounded += 1
            else:
                bound += cap
        return bound

    return {
        BARE: bare,
        "typed decode (prepare's fast-path shape)": typed,
        "typed decode naming the cap fields + cap rule": typed_with_caps,
        "+ output cap read inline": caps_inline,
        "+ estimate inlined (cap sums, 1 in 32 sampled)": hot_loop,
        "+ ChunkTally.add, sampled (default)": tally("sampled"),
        "+ ChunkTally.add, heuristic every line": tally("heuristic"),
        "+ ChunkTally.add, exact every line": tally("exact"),
    }


def _typed_decoders() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    """Two msgspec decoders of a request line: the fields validation reads, and the same plus the body
    fields the output cap is read from (the rest of the body is skipped by both)."""
    import msgspec

    from airflow_openai_batch.core.cost import output_cap_fields

    def request(extra: list[tuple[str, Any, Any]]) -> Any:
        body = msgspec.defstruct("Body", [("model", str), ("stream", bool | None, None), *extra], gc=False)
        top = [("custom_id", str), ("method", str), ("url", str), ("body", body)]
        return msgspec.json.Decoder(msgspec.defstruct("Request", top, gc=False)).decode

    return request([]), request([(name, Any, None) for name in output_cap_fields(CHAT)])


def _throughput(texts: list[str], encoding: str) -> dict[str, float]:
    from airflow_openai_batch.core.cost import exact_counter

    counter = exact_counter(encoding)
    if counter is None:
        return {}
    counter.count_texts(texts[:1])  # the encoding loads once per process: not what is measured
    best = float("inf")
    tokens = 0
    for _ in range(3):
        t0 = time.perf_counter()
        tokens = sum(counter.count_texts(texts))
        best = min(best, time.perf_counter() - t0)
    return {"tokens": tokens, "seconds": best, "tokens_per_second": tokens / best}


def run(requests_path: str, rounds: int = 5) -> dict[str, Any]:
    """The figures of one child process (see the module docstring)."""
    from airflow_openai_batch.core.cost import exact_counter
    from tests.support.multilingual import multilingual_texts

    lines = Path(requests_path).read_bytes().splitlines()
    t0 = time.perf_counter()
    exact_counter("o200k_base").count_texts(["warm up"])  # type: ignore[union-attr]
    load_seconds = time.perf_counter() - t0
    loops = _loops(lines)
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(rounds):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            loop()
            best[name] = min(best[name], time.perf_counter() - t0)
    prompts = [m["content"] for line in lines[:50_000] for m in orjson.loads(line)["body"]["messages"]]
    multilingual = [text for _, text in multilingual_texts(per_kind=500)]
    return {
        "lines": len(lines),
        "seconds": best,
        "encoding_load_seconds": load_seconds,
        "exact_prompts": _throughput(prompts, "o200k_base"),
        "exact_multilingual_o200k": _throughput(multilingual, "o200k_base"),
        "exact_multilingual_cl100k": _throughput(multilingual, "cl100k_base"),
    }


def bench(runner: Any, lines: int) -> list[Row]:
    """The ``cost`` section of ``make bench``."""
    path = runner.tmp / "data" / f"cost-requests-{lines}.jsonl"
    gen.write_requests(path, lines)
    result = runner.child("cost", {"kind": "cost", "kwargs": {"requests_path": str(path)}})
    runner.raw["cost"] = result
    path.unlink()
    seconds = result["seconds"]
    bare = seconds[BARE]
    case = f"Cost estimate, {lines:,} chat lines"
    rows = []
    for name, spent in seconds.items():
        if name == BARE:
            continue
        extra_ns = (spent - bare) / lines * 1e9
        rows.append(
            Row(
                f"{case}: {name}",
                "lines/s",
                lines / spent,
                BARE,
                lines / bare,
                target="(info)",
                note=f"{extra_ns:+.0f} ns/line",
            )
        )
    for key, label in (
        ("exact_prompts", "the bench prompts (English), o200k_base"),
        ("exact_multilingual_o200k", "multilingual set, o200k_base"),
        ("exact_multilingual_cl100k", "multilingual set, cl100k_base"),
    ):
        figures = result[key]
        if figures:
            rows.append(
                Row(
                    f"Exact token counting (toktok-rs), {label}",
                    "M tokens/s",
                    figures["tokens_per_second"] / 1e6,
                    "",
                    None,
                    target="(info)",
                    note=f"{figures['tokens']:,} tokens; encoding load "
                    f"{result['encoding_load_seconds']:.2f} s once per process",
                )
            )
    return rows

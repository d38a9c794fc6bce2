"""Stream batch requests, validate every line and split them into upload-ready JSONL chunk files.

No Airflow import and no network: this is the hot path for multi-gigabyte inputs, in one process.

stream -> validate -> split -> chunk files:

- The input is taken in blocks of about a megabyte (the raw blocks read, when it comes from
  :func:`~airflow_openai_batch.core.jsonl.iter_lines`).
- Validate (:class:`~airflow_openai_batch.core.requests.RequestRules`): a block whose lines are all valid
  and need no change is decoded in one call that skips the bodies' contents; any other block is checked
  line by line, which names every problem. Repeated custom_ids are found at the end
  (:class:`~airflow_openai_batch.core.duplicates.DuplicateFinder`).
- Split (:class:`_Splitter`): the valid lines of each model go, in input order, into that model's open
  chunk until the next would break a limit (requests, bytes, embedding inputs, estimated tokens), which
  then starts the model's next chunk: the fewest chunks a sequential cut allows.
- Lines that need no change are written byte for byte, a whole block in one write where it fits.
- Cost (:class:`~airflow_openai_batch.core.cost.CostEstimator`): each chunk sums its lines' output caps
  and, when every line's prompt is counted (exact counting, or ``max_enqueued_tokens``), their prompt
  tokens; otherwise one line in :data:`_SAMPLE_EVERY` of each block is
  counted and the chunks' bytes are scaled by what those lines weigh. The estimate is always made.
- A response schema (:mod:`~airflow_openai_batch.core.schema`) is put into each line that has no format
  of its own, before the lines are measured.

On any problem nothing is kept: the chunk files are removed and one
:class:`~airflow_openai_batch.exceptions.OpenAIBatchInputError` lists the problems.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import itertools
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from airflow_openai_batch.core.cost import (
    KEEP_LINES,
    CostEstimate,
    CostEstimator,
    PriceTable,
    token_count_mode,
)
from airflow_openai_batch.core.duplicates import DuplicateFinder
from airflow_openai_batch.core.jsonl import LineIterator, iter_lines, unix_line_ends
from airflow_openai_batch.core.requests import (
    NotALine,
    RequestRules,
    ValidLines,
    describe,
    normalize_endpoint,
)
from airflow_openai_batch.core.schema import SchemaInjector, response_schema
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError
from airflow_openai_batch.limits import (
    MAX_BYTES_PER_BATCH,
    MAX_EMBEDDING_INPUTS_PER_BATCH,
    MAX_REQUESTS_PER_BATCH,
)

__all__ = [
    "BuiltLines",
    "Chunk",
    "LineBuilder",
    "PreparedInput",
    "normalize_endpoint",
    "prepare_from_built",
    "prepare_from_lines",
    "prepare_from_records",
]

#: Lines given one by one (not as raw blocks) are taken in blocks of about this many bytes, or lines.
_BLOCK_BYTES = 1 << 20
_BLOCK_LINES = 8192
#: One line in this many of each block has its prompt counted for the default (sampled) estimate: a few
#: hundred lines per 100k give a chunk's tokens per byte, at ~1 % of the prep time (cost's own default, 32,
#: costs ~10 %).
_SAMPLE_EVERY = 256
#: A limit that is off: never reached.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Chunk:
    """One upload-ready JSONL file: one model, within every per-batch limit.

    :param index: 0-based position in output order (models by first appearance, then sequence).
    :param path: the local JSONL file holding exactly the lines to upload.
    :param model: the model of every request in the file.
    :param request_count: number of request lines.
    :param byte_count: size of the file in bytes (lines plus their newlines).
    :param embedding_inputs: embedding inputs across the file's requests (0 for other endpoints).
    :param estimated_tokens: its prompt tokens as the cost estimate has them (counted, or estimated).
    :param sha256: hex digest of the file content, for retry-safe idempotency keys.
    :param first_custom_id: the ``custom_id`` of the file's first line.
    """

    index: int
    path: Path
    model: str
    request_count: int
    byte_count: int
    embedding_inputs: int
    estimated_tokens: int
    sha256: str
    first_custom_id: str


@dataclass
class PreparedInput:
    """The validated, split input.

    :param chunks: the chunk files, in output order.
    :param total_requests: requests across all chunks.
    :param total_bytes: bytes across all chunk files.
    :param work_dir: the directory holding the chunk files.
    :param endpoint: the normalized endpoint every line's ``url`` equals.
    :param cost: the cost estimate, per chunk (in chunk order) and in total.
    :param own_formats: with a response schema, the lines that kept a format of their own.
    """

    chunks: list[Chunk]
    total_requests: int
    total_bytes: int
    work_dir: Path
    endpoint: str = ""
    cost: CostEstimate | None = None
    own_formats: int = 0

    def cleanup(self) -> None:
        """Delete the chunk files (missing ones are ignored)."""
        for chunk in self.chunks:
            chunk.path.unlink(missing_ok=True)

    def __enter__(self) -> PreparedInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass(frozen=True)
class BuiltLines:
    """Request lines a caller built itself (a table's, from a template) and checked with the request
    rules it was given (see :class:`LineBuilder`), with what it knows of each line: the splitter and the
    estimate take them as they are, and only their custom_ids are still checked here (for repeats).

    :param data: the lines, each ending with a newline (bytes, or a buffer of them: written through).
    :param ends: where each line ends in ``data``, newline included, after a leading 0 (one more entry
        than there are lines).
    :param ids: each line's custom_id (a non-empty string).
    :param model: the model of every line.
    :param cap: the output-token cap of every line (``None``: none): the lines share their body but for
        what the rows fill in.
    :param inputs: each line's embedding inputs (embeddings endpoint only, else ``None``).
    :param tokens: each line's prompt tokens when every line is counted, else ``None`` (then sampled).
    :param own_formats: lines that kept their own format where a response schema was to be put in.
    :param longest: the bytes of the longest line, newline included (``None``: not known).
    :param ascending_ids: the ids ascend as :class:`~airflow_openai_batch.core.duplicates.DuplicateFinder`
        orders them, so they hold no repeat among themselves (``None``: not known).
    """

    data: bytes | memoryview
    ends: list[int]
    ids: list[str]
    model: str
    cap: int | None
    inputs: list[int] | None = None
    tokens: list[int] | None = None
    own_formats: int = 0
    longest: int | None = None
    ascending_ids: bool | None = None


class LineBuilder(Protocol):
    """A source that builds its request lines itself, given the submission's rules (a table from a
    prompt template: :class:`~airflow_openai_batch.core.tables.TableRequests`)."""

    def built_blocks(self, rules: RequestRules) -> Iterable[BuiltLines | bytes]:
        """The lines in order: :class:`BuiltLines` that ``rules`` accept as they are (the builder applies
        the rules' model, response schema and limits itself), or newline-terminated raw blocks, which are
        validated line by line like a JSONL file's (and name every problem)."""
        ...


# -- splitting --------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    """What a chunk holds, or may hold (the limits): the four quantities a cut is decided by."""

    requests: int = 0
    bytes: int = 0
    inputs: int = 0
    tokens: int = 0

    def room_in(self, limits: _Counts) -> _Counts:
        """What still fits under ``limits`` beside what is counted here."""
        return _Counts(
            limits.requests - self.requests,
            limits.bytes - self.bytes,
            limits.inputs - self.inputs,
            limits.tokens - self.tokens,
        )

    def within(self, limits: _Counts) -> bool:
        return (
            self.requests <= limits.requests
            and self.bytes <= limits.bytes
            and self.inputs <= limits.inputs
            and self.tokens <= limits.tokens
        )

    def add(self, other: _Counts) -> None:
        self.requests += other.requests
        self.bytes += other.bytes
        self.inputs += other.inputs
        self.tokens += other.tokens


class _Run:
    """Valid request lines of one model, in input order: what the splitter places.

    :param lines: the lines, without their newline; ``None`` when ``ends`` says where they are in ``data``.
    :param ids: the custom_id of each line.
    :param inputs: embedding inputs of each line, or ``None`` when not counted.
    :param tokens: estimated prompt tokens of each line, or ``None`` when not counted.
    :param caps: the output-token cap of each line (``None``: none).
    :param numbers: the 1-based input line number of each line.
    :param data: the lines each ending with a newline, when at hand (a whole block: written as it is).
    :param ends: where each line ends in ``data`` (newline included), after a leading 0, when the caller
        knows it (lines built from a table): the lines need not be split out of ``data``.
    :param one_cap: every line has the cap ``caps[0]``.
    :param longest: the bytes of the longest line, newline included, when the caller knows it.
    """

    def __init__(
        self,
        lines: list[bytes] | None,
        ids: list[str],
        inputs: list[int] | None,
        tokens: list[int] | None,
        caps: list[int | None],
        numbers: range | list[int],
        data: bytes | None = None,
        ends: list[int] | None = None,
        one_cap: bool = False,
        longest: int | None = None,
    ) -> None:
        self.lines = lines
        self.ids = ids
        self.inputs = inputs
        self.tokens = tokens
        self.caps = caps
        self.numbers = numbers
        self.data = data
        self.one_cap = one_cap
        self._longest = longest
        #: Running totals of bytes, inputs and tokens: entry i counts the lines before line i.
        self._sums: tuple[list[int], list[int] | None, list[int] | None] | None = None
        self._ends = ends

    def __len__(self) -> int:
        return len(self.ids)

    def _running_totals(self) -> tuple[list[int], list[int] | None, list[int] | None]:
        if self._sums is None:

            def running(values: Iterable[int] | None) -> list[int] | None:
                return list(itertools.accumulate(values, initial=0)) if values is not None else None

            sizes = self._ends or running(len(line) + 1 for line in self.lines)  # type: ignore[union-attr]
            self._sums = (sizes, running(self.inputs), running(self.tokens))  # type: ignore[assignment]
        return self._sums  # type: ignore[return-value]

    def counts(self, start: int, stop: int) -> _Counts:
        """What lines ``[start, stop)`` count."""
        if self.data is not None and start == 0 and stop == len(self):
            inputs = sum(self.inputs) if self.inputs is not None else 0
            return _Counts(stop, len(self.data), inputs, sum(self.tokens) if self.tokens is not None else 0)
        return _Counts(stop - start, *(s[stop] - s[start] if s else 0 for s in self._running_totals()))

    def fitting(self, start: int, room: _Counts) -> int:
        """How many lines from ``start`` on fit in ``room``, in order (the greedy cut)."""
        stop = min(len(self), start + room.requests)
        if start == 0 and stop == len(self) and self.counts(0, stop).within(room):
            return stop
        for sums, free in zip(self._running_totals(), (room.bytes, room.inputs, room.tokens), strict=True):
            if sums is not None:
                stop = min(stop, bisect.bisect_right(sums, sums[start] + free, start, stop + 1) - 1)
        return stop - start

    def piece(self, start: int, stop: int) -> bytes:
        """Lines ``[start, stop)``, each ending with a newline."""
        if self.data is None:
            return b"".join(line + b"\n" for line in self.lines[start:stop])  # type: ignore[index]
        if start == 0 and stop == len(self):
            return self.data
        sizes = self._running_totals()[0]
        return self.data[sizes[start] : sizes[stop]]

    def line(self, index: int) -> bytes:
        """Line ``index``, without its newline."""
        if self.lines is not None:
            return self.lines[index]
        ends = self._ends
        return bytes(self.data[ends[index] : ends[index + 1] - 1])  # type: ignore[index]

    def longest(self, start: int, stop: int) -> int:
        """The bytes (newline included) of the longest of lines ``[start, stop)``."""
        if self._longest is not None and start == 0 and stop == len(self):
            return self._longest
        if self.lines is not None:
            whole = start == 0 and stop == len(self.lines)
            return max(map(len, self.lines if whole else self.lines[start:stop])) + 1
        ends = self._ends
        return max(map(operator.sub, ends[start + 1 : stop + 1], ends[start:stop]))  # type: ignore[index]

    def index_of_size(self, start: int, stop: int, size: int) -> int:
        """The index of the first of lines ``[start, stop)`` of ``size`` bytes (newline included)."""
        if self.lines is not None:
            return start + list(map(len, self.lines[start:stop])).index(size - 1)
        ends = self._ends
        return start + list(map(operator.sub, ends[start + 1 : stop + 1], ends[start:stop])).index(size)  # type: ignore[index]


class _OpenChunk:
    """A chunk file being filled for one model.

    :param model: the model of its requests.
    :param order: the model's rank by first appearance.
    :param seq: the chunk's rank among the model's chunks.
    :param path: its file while being filled.
    :param first_custom_id: the custom_id of its first line.
    """

    def __init__(self, model: str, order: int, seq: int, path: Path, first_custom_id: str) -> None:
        self.model = model
        self.order = order
        self.seq = seq
        self.path = path
        self.first_custom_id = first_custom_id
        self.counts = _Counts()
        self.hasher = hashlib.sha256()
        #: For the cost estimate: the sum of the caps set, the lines setting none (and the first of their
        #: numbers), and (bytes with newline, line number) of the largest line.
        self.output_bound = 0
        self.unbounded = 0
        self.unbounded_lines: list[int] = []
        self.largest = (0, 0)

    def write(self, run: _Run, start: int, stop: int) -> None:
        """Lines ``[start, stop)`` of ``run``."""
        data = run.piece(start, stop)
        # Opened per write (once per block at most) so that any number of models holds no descriptors.
        with open(self.path, "ab" if self.counts.requests else "wb") as fh:
            fh.write(data)
        self.hasher.update(data)
        self.counts.add(run.counts(start, stop))
        if run.one_cap:
            # One cap for every line (the usual block): one product, no pass over the lines.
            cap = run.caps[start]
            unbounded = stop - start if cap is None else 0
            self.output_bound += cap * (stop - start) if cap is not None else 0
        else:
            caps = run.caps[start:stop]
            unbounded = caps.count(None)
            self.output_bound += sum(filter(None, caps))  # type: ignore[arg-type]
        if unbounded:
            self.unbounded += unbounded
            room = KEEP_LINES - len(self.unbounded_lines)
            if room > 0:
                numbers = run.numbers
                if run.one_cap:
                    self.unbounded_lines += numbers[start : start + min(room, unbounded)]
                else:
                    self.unbounded_lines += [numbers[start + i] for i, c in enumerate(caps) if c is None][
                        :room
                    ]
        # The size alone first: which line it is matters only for a new largest (rare after the first).
        longest = run.longest(start, stop)
        if longest > self.largest[0]:
            self.largest = (longest, run.numbers[run.index_of_size(start, stop, longest)])


class _Splitter:
    """Groups valid lines by model and cuts each model's lines into chunks: a line that would break a
    limit closes its model's chunk and opens the next one.

    :param work_dir: where the chunk files are written.
    :param limits: what one chunk may hold.
    """

    def __init__(self, work_dir: Path, limits: _Counts) -> None:
        self.work_dir = work_dir
        self.limits = limits
        self.open: dict[str, _OpenChunk] = {}
        self.closed: list[_OpenChunk] = []
        #: Each model's rank by first appearance, and how many chunks it has had.
        self.models: dict[str, list[int]] = {}

    def place(self, valid: ValidLines, numbers: range | list[int]) -> None:
        """Place valid lines, ``numbers`` being their input line numbers."""
        if isinstance(valid.models, str):
            run = _Run(
                valid.lines,
                valid.ids,
                valid.inputs,
                valid.tokens,
                valid.caps,
                numbers,
                valid.data,
                one_cap=valid.one_cap,
            )
            self.place_run(valid.models, run)
        else:
            self._place_grouped(valid, numbers)

    def _place_grouped(self, valid: ValidLines, numbers: range | list[int]) -> None:
        """Place lines of several models: each model's lines in their order, models by first appearance."""
        by_model: dict[str, list[int]] = {}
        for index, model in enumerate(valid.models):
            by_model.setdefault(model, []).append(index)
        for model, picked in by_model.items():

            def pick(values: Any) -> list[Any]:
                return [values[i] for i in picked]  # noqa: B023 - used at once

            self.place_run(
                model,
                _Run(
                    pick(valid.lines),
                    pick(valid.ids),
                    pick(valid.inputs) if valid.inputs is not None else None,
                    pick(valid.tokens) if valid.tokens is not None else None,
                    pick(valid.caps),
                    pick(numbers),
                    one_cap=valid.one_cap,
                ),
            )

    def place_run(self, model: str, run: _Run) -> None:
        """Place one model's lines in order, closing its chunk where the next line would break a limit."""
        start = 0
        while start < len(run):
            chunk = self.open.get(model) or self._open(model, run.ids[start])
            fit = run.fitting(start, chunk.counts.room_in(self.limits))
            if not fit:
                # Every line fits in an empty chunk (a line that does not is invalid): cut here.
                assert chunk.counts.requests, "a line larger than a whole chunk passed validation"
                self.closed.append(self.open.pop(model))
                continue
            chunk.write(run, start, start + fit)
            start += fit

    def _open(self, model: str, first_custom_id: str) -> _OpenChunk:
        order, seq = self.models.setdefault(model, [len(self.models), 0])
        self.models[model][1] += 1
        path = self.work_dir / f"m{order:04d}-s{seq:06d}.jsonl.part"
        chunk = self.open[model] = _OpenChunk(model, order, seq, path, first_custom_id)
        return chunk

    def chunks(self) -> list[_OpenChunk]:
        """Every chunk, in output order: models by first appearance, then sequence."""
        return sorted([*self.closed, *self.open.values()], key=lambda c: (c.order, c.seq))


# -- validation ------------------------------------------------------------------------------------------


class _Problems:
    """The problems found: every one counted, the first ``cap`` kept."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept: list[InputProblem] = []
        self.total = 0

    def add(self, line: int | None, field: str | None, reason: str) -> None:
        self.total += 1
        if len(self.kept) < self.cap:
            self.kept.append(InputProblem(line, field, reason))


class _Preparer:
    """Validates blocks of lines in input order and hands the valid ones to the splitter."""

    def __init__(
        self,
        rules: RequestRules,
        splitter: _Splitter,
        work_dir: Path,
        max_problems: int,
        estimator: CostEstimator,
    ) -> None:
        self.rules = rules
        self.splitter = splitter
        self.estimator = estimator
        #: Lines that kept their own format where a response schema was to be put in.
        self.own_formats = 0
        self.ids = DuplicateFinder(work_dir)
        self.problems = _Problems(max_problems)
        self.lines_read = 0  # blank ones included: line numbers are 1-based positions in the input
        self.requests_read = 0  # lines that are not blank

    def take_block(self, data: bytes) -> None:
        """Newline-terminated lines."""
        lines = data.split(b"\n")
        lines.pop()  # after the last newline
        self._take(lines, data)

    def take_lines(self, lines: list[Any]) -> None:
        """Lines without their newline."""
        try:
            data: bytes | None = b"\n".join(lines) + b"\n"
        except TypeError:
            data = None  # not all bytes: only the line by line check knows what to say
        if data is not None and data.count(b"\n") != len(lines):
            data = None  # a line with a newline inside (two lines in a chunk file): checked on its own
        self._take(lines, data)

    def _take(self, lines: list[Any], data: bytes | None) -> None:
        """Validate consecutive lines (as a block when ``data``, the lines with their newlines, is given),
        then place the valid ones, unless the input is rejected already."""
        valid = self.rules.check_block(lines, data) if data is not None else None
        ids: list[str | None]
        if valid is not None:
            ids = valid.ids  # type: ignore[assignment]
            self.requests_read += len(lines)
        else:
            checked, valid = self.rules.check_lines(lines)
            ids = []
            for number, one in enumerate(checked, self.lines_read + 1):
                ids.append(one.custom_id if one is not None else None)
                if one is not None:  # not blank
                    self.requests_read += 1
                    for field, reason in one.problems:
                        self.problems.add(number, field, reason)
        first = self.lines_read + 1
        self.ids.add(first, ids)
        self.lines_read += len(lines)
        if valid.ids and not self.problems.total:  # once the input is rejected, nothing more is written
            numbers: range | list[int]
            if valid.positions is None:
                numbers = range(first, first + len(valid.lines))
            else:
                numbers = [first + position for position in valid.positions]
            self.splitter.place(valid, numbers)
            self.own_formats += valid.own_formats
            if valid.tokens is None:
                self._sample(valid.models, valid.lines.__getitem__, len(valid.lines), numbers)

    def take_built(self, built: BuiltLines) -> None:
        """Lines built and checked by the caller: their ids are checked for repeats, the rest is placed
        as it is."""
        first = self.lines_read + 1
        count = len(built.ids)
        self.ids.add(first, built.ids, ascending=built.ascending_ids)  # type: ignore[arg-type]
        self.lines_read += count
        self.requests_read += count
        if not count or self.problems.total:
            return
        numbers = range(first, first + count)
        run = _Run(
            None,
            built.ids,
            built.inputs,
            built.tokens,
            [built.cap] * count,
            numbers,
            built.data,
            built.ends,
            one_cap=True,
            longest=built.longest,
        )
        self.splitter.place_run(built.model, run)
        self.own_formats += built.own_formats
        if built.tokens is None:
            self._sample(built.model, run.line, count, numbers)

    def _sample(
        self, models: str | list[str], line_at: Callable[[int], bytes], count: int, numbers: range | list[int]
    ) -> None:
        """Count the prompt of one line in _SAMPLE_EVERY for the estimate (when lines are not all counted):
        a chunk's prompt tokens are its bytes times what its model's sampled lines weigh per byte."""
        sample = self.estimator.sample
        picked = range(0, count, self.estimator.sample_every)
        if not isinstance(models, str):
            # Each model's first line too: a model whose lines fall between the picks is still weighed.
            picked = sorted({*picked, *map(models.index, set(models))})  # type: ignore[assignment]
        for index in picked:
            line = line_at(index)
            model = models if isinstance(models, str) else models[index]
            sample(model, numbers[index], len(line) + 1, orjson.loads(line)["body"])

    def problems_at_end(self) -> None:
        """Add what only the whole input shows (emptiness, repeated custom_ids); raise if any problem."""
        problems = self.problems
        if not self.requests_read and not problems.total:
            problems.add(None, None, "the input is empty")
        repeated, first = self.ids.duplicates(problems.cap)
        if repeated:
            duplicates = [
                InputProblem(
                    line, "custom_id", f"duplicate custom_id {describe(cid)}, first used on line {used}"
                )
                for line, cid, used in first
            ]
            problems.total += repeated
            # Both lists are in line order and capped: merging keeps the earliest problems. The stable
            # sort puts a line's duplicate first, where its custom_id problems go.
            problems.kept = sorted(duplicates + problems.kept, key=lambda p: p.line or 0)[: problems.cap]
        if problems.total:
            raise OpenAIBatchInputError(problems.kept, problems.total)


def _blocks(lines: Iterable[Any]) -> Iterator[bytes | list[Any]]:
    """The input in blocks: raw newline-terminated blocks straight from
    :func:`~airflow_openai_batch.core.jsonl.iter_lines`, else lists of lines of about a megabyte."""
    raw = lines.take_raw_blocks() if isinstance(lines, LineIterator) else None
    if raw is not None:
        yield from map(unix_line_ends, raw)
        return
    block: list[Any] = []
    size = 0
    for line in lines:
        block.append(line)
        size += len(line) if isinstance(line, (bytes, str)) else 0
        if size >= _BLOCK_BYTES or len(block) == _BLOCK_LINES:
            yield block
            block = []
            size = 0
    if block:
        yield block


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _prepare(
    lines: Iterable[Any],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None,
    max_requests_per_batch: int,
    max_bytes_per_batch: int,
    max_embedding_inputs: int,
    max_enqueued_tokens: int | None,
    max_problems: int,
    schema: Any,
    token_count: str | None,
    prices: PriceTable | Mapping[str, Mapping[str, Any]] | str | None,
    builder: LineBuilder | None = None,
) -> PreparedInput:
    """Check the arguments, then validate and split, keeping nothing on failure."""
    _check_limits(
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
    )
    normalized = normalize_endpoint(endpoint)
    injector = SchemaInjector(response_schema(schema), normalized) if schema is not None else None
    mode = (
        token_count if token_count is not None else token_count_mode(max_enqueued_tokens=max_enqueued_tokens)
    )
    estimator = CostEstimator(
        normalized,
        prices=prices if isinstance(prices, PriceTable) else PriceTable.load(prices),
        count=mode,
        sample_every=_SAMPLE_EVERY,
    )
    rules = RequestRules(
        normalized,
        model=model,
        max_bytes=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_tokens=max_enqueued_tokens,
        # Every line counted: exactly when asked, else for the token limit (the estimator's heuristic).
        prompt_tokens=estimator.prompt_tokens if mode != "sampled" or max_enqueued_tokens else None,
        schema=injector,
    )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    limits = _Counts(
        max_requests_per_batch,
        max_bytes_per_batch,
        max_embedding_inputs if rules.counts_inputs else _UNLIMITED,
        max_enqueued_tokens if max_enqueued_tokens is not None else _UNLIMITED,
    )
    splitter = _Splitter(work_dir, limits)
    preparer = _Preparer(rules, splitter, work_dir, max_problems, estimator)
    try:
        for block in builder.built_blocks(rules) if builder is not None else _blocks(lines):
            if isinstance(block, BuiltLines):
                preparer.take_built(block)
            elif isinstance(block, bytes):
                preparer.take_block(block)
            else:
                preparer.take_lines(block)
        preparer.problems_at_end()
        opened = splitter.chunks()
        for index, oc in enumerate(opened):
            estimator.chunk(index, oc.model).add_summary(
                oc.counts.requests,
                oc.counts.bytes,
                oc.output_bound,
                oc.unbounded,
                oc.unbounded_lines,
                oc.largest,
                prompt_tokens=oc.counts.tokens if rules.prompt_tokens is not None else None,
            )
        cost = estimator.finish()
        chunks: list[Chunk] = []
        for index, oc in enumerate(opened):
            final = work_dir / f"chunk-{index:05d}.jsonl"
            os.replace(oc.path, final)
            oc.path = final
            counts = oc.counts
            chunks.append(
                Chunk(
                    index=index,
                    path=final,
                    model=oc.model,
                    request_count=counts.requests,
                    byte_count=counts.bytes,
                    embedding_inputs=counts.inputs,
                    estimated_tokens=cost.chunks[index].input_tokens,
                    sha256=oc.hasher.hexdigest(),
                    first_custom_id=oc.first_custom_id,
                )
            )
    except BaseException:
        # Nothing half-written may be mistaken for an upload-ready chunk.
        for oc in splitter.chunks():
            with contextlib.suppress(OSError):
                oc.path.unlink(missing_ok=True)
        raise
    finally:
        preparer.ids.cleanup()
    return PreparedInput(
        chunks=chunks,
        total_requests=sum(c.request_count for c in chunks),
        total_bytes=sum(c.byte_count for c in chunks),
        work_dir=work_dir,
        endpoint=rules.endpoint,
        cost=cost,
        own_formats=preparer.own_formats,
    )


def prepare_from_lines(
    lines: Iterable[bytes],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS_PER_BATCH,
    max_enqueued_tokens: int | None = None,
    max_problems: int = 50,
    response_schema: Any = None,
    token_count: str | None = None,
    prices: PriceTable | Mapping[str, Mapping[str, Any]] | str | None = None,
) -> PreparedInput:
    """Validate JSONL request lines and split them into chunk files, streaming.

    Every line is validated before this returns; on any problem the partial chunk files are deleted and
    one :class:`OpenAIBatchInputError` lists the problems (1-based line numbers; blank lines are skipped
    but counted). Lines that need no change are written byte-for-byte.

    :param lines: the raw lines without their newline, e.g. ``iter_lines(stream)``. A binary file object
        is accepted too and read with :func:`~airflow_openai_batch.core.jsonl.iter_lines`.
    :param endpoint: the batch endpoint; every line's ``url`` must equal its normalized form.
    :param work_dir: where the chunk files are written (created if missing).
    :param model: fills ``body.model`` where a line has none (or an empty one).
    :param max_requests_per_batch: requests per chunk.
    :param max_bytes_per_batch: bytes per chunk file, newlines included.
    :param max_embedding_inputs: embedding inputs per chunk (``/v1/embeddings`` only).
    :param max_enqueued_tokens: if set, prompt tokens per chunk (counted with the estimate's counter).
    :param max_problems: how many problems the error lists (all are counted).
    :param response_schema: a Pydantic model class or a JSON Schema dict
        (:func:`~airflow_openai_batch.core.schema.response_schema`), put into every chat completions /
        responses line without a format of its own; ``None``: lines are left as they are.
    :param token_count: how the cost estimate counts prompt tokens: ``"exact"`` (every line, with
        OpenAI's encoding when the ``[tokens]`` extra is installed) or ``"sampled"`` (one line in 256
        of each block, scaled by bytes); ``None``: exact when ``max_enqueued_tokens`` is set (see
        :func:`~airflow_openai_batch.core.cost.token_count_mode`).
    :param prices: price overrides for the estimate (see
        :meth:`~airflow_openai_batch.core.cost.PriceTable.load`), or a price table.
    :return: the chunks, in order: models by first appearance, then sequence within the model.
    :raises OpenAIBatchInputError: the input is invalid, empty, or the endpoint unknown; or the response
        schema is one strict mode cannot use, or given for an endpoint without structured answers.
    """
    if isinstance(lines, io.IOBase):
        # A file object iterates lines *with* their newline; read it the streaming way instead.
        lines = iter_lines(lines)  # type: ignore[arg-type]
    return _prepare(
        lines,
        endpoint=endpoint,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
        schema=response_schema,
        token_count=token_count,
        prices=prices,
    )


def prepare_from_built(
    builder: LineBuilder,
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS_PER_BATCH,
    max_enqueued_tokens: int | None = None,
    max_problems: int = 50,
    response_schema: Any = None,
    token_count: str | None = None,
    prices: PriceTable | Mapping[str, Mapping[str, Any]] | str | None = None,
) -> PreparedInput:
    """Split lines a builder made and checked itself into chunk files (a table's lines: the submit
    operator's path for a table with a prompt template), as :func:`prepare_from_lines` does a JSONL file's.

    The builder is given the submission's :class:`~airflow_openai_batch.core.requests.RequestRules` (built
    from these arguments) and hands back :class:`BuiltLines` the rules accept as they are, or raw blocks,
    which go through the line validator. Repeated custom_ids, the split, the chunk files and the cost
    estimate are the same as for :func:`prepare_from_lines`.

    :param builder: the source of the lines.
    :param endpoint: as in :func:`prepare_from_lines`; so are all other parameters.
    :return: the chunks, in order.
    :raises OpenAIBatchInputError: as :func:`prepare_from_lines`; or what the builder raises.
    """
    return _prepare(
        (),
        endpoint=endpoint,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
        schema=response_schema,
        token_count=token_count,
        prices=prices,
        builder=builder,
    )


def _default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"type {type(value).__name__} is not JSON-serializable")


def _record_lines(records: Iterable[Any], endpoint: str) -> Iterator[bytes | NotALine]:
    """Serialize records to request lines, filling a missing method/url, in the usual key order."""
    for record in records:
        if isinstance(record, Mapping):
            obj: Any = {}
            if "custom_id" in record:
                obj["custom_id"] = record["custom_id"]
            obj["method"] = record.get("method", "POST")
            obj["url"] = record.get("url", endpoint)
            if "body" in record:
                obj["body"] = record["body"]
            for key, value in record.items():
                if key not in obj:
                    obj[key] = value
        else:
            obj = record
        try:
            yield orjson.dumps(obj, default=_default)
        except TypeError as exc:
            yield NotALine(str(exc))


def prepare_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    endpoint: str,
    work_dir: Path | str,
    model: str | None = None,
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS_PER_BATCH,
    max_enqueued_tokens: int | None = None,
    max_problems: int = 50,
    response_schema: Any = None,
    token_count: str | None = None,
    prices: PriceTable | Mapping[str, Mapping[str, Any]] | str | None = None,
) -> PreparedInput:
    """Validate request records (e.g. from XCom) and split them into chunk files.

    Each item is a full request line ``{custom_id, method, url, body}`` or just ``{custom_id, body}``
    (``method`` "POST" and ``url`` = the endpoint are filled in). Items are serialized and go through
    the same validation and splitting as :func:`prepare_from_lines`; problems are numbered by 1-based
    item index.

    :param records: the request items.
    :param endpoint: the batch endpoint.
    :param work_dir: where the chunk files are written (created if missing).
    :param model: fills ``body.model`` where an item has none.
    :param max_requests_per_batch: requests per chunk.
    :param max_bytes_per_batch: bytes per chunk file, newlines included.
    :param max_embedding_inputs: embedding inputs per chunk (``/v1/embeddings`` only).
    :param max_enqueued_tokens: if set, prompt tokens per chunk (counted with the estimate's counter).
    :param max_problems: how many problems the error lists (all are counted).
    :param response_schema: as in :func:`prepare_from_lines`.
    :param token_count: as in :func:`prepare_from_lines`.
    :param prices: as in :func:`prepare_from_lines`.
    :return: the chunks, in order.
    :raises OpenAIBatchInputError: the input is invalid, empty, or the endpoint unknown; or the response
        schema is one strict mode cannot use, or given for an endpoint without structured answers.
    """
    normalized = normalize_endpoint(endpoint)
    return _prepare(
        _record_lines(records, normalized),
        endpoint=normalized,
        work_dir=work_dir,
        model=model,
        max_requests_per_batch=max_requests_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
        max_embedding_inputs=max_embedding_inputs,
        max_enqueued_tokens=max_enqueued_tokens,
        max_problems=max_problems,
        schema=response_schema,
        token_count=token_count,
        prices=prices,
    )

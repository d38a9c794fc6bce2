"""Submit operator: validate, split, upload and create batches, never twice for the same chunk."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airflow_openai_batch.compat import BaseOperator, task_state_store
from airflow_openai_batch.core.cost import token_count_mode
from airflow_openai_batch.core.job import Attempt, CreateSpec, Job
from airflow_openai_batch.core.job import Chunk as JobChunk
from airflow_openai_batch.core.jsonl import iter_lines
from airflow_openai_batch.core.prepare import (
    Chunk,
    PreparedInput,
    normalize_endpoint,
    prepare_from_lines,
    prepare_from_records,
)
from airflow_openai_batch.core.progress import describe_api_error
from airflow_openai_batch.core.resubmit import (
    METADATA_ATTEMPT,
    METADATA_FOLLOWS,
    METADATA_KEY,
    refused_for_capacity,
)
from airflow_openai_batch.core.table_format import TABLE_FORMATS, table_format
from airflow_openai_batch.exceptions import InputProblem, OpenAIBatchInputError
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.limits import (
    COMPLETION_WINDOW,
    MAX_BYTES_PER_BATCH,
    MAX_FILE_EXPIRES_AFTER,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    MAX_REQUESTS_PER_BATCH,
    MIN_FILE_EXPIRES_AFTER,
)
from airflow_openai_batch.links import OpenAIBatchesPageLink, OpenAIBatchLink, persist_batch_links
from airflow_openai_batch.operators._workdir import task_work_dir
from airflow_openai_batch.statuses import REUSABLE_STATUSES

if TYPE_CHECKING:
    from collections.abc import Callable

    from openai.types import Batch

    from airflow_openai_batch.compat import Context
    from airflow_openai_batch.core.tables import TableInput, TableSource

#: Metadata keys this package adds to every batch (they count against OpenAI's 16-pair limit).
METADATA_CHUNK = "aob_chunk"
METADATA_DAG = "airflow_dag_id"
METADATA_TASK = "airflow_task_id"
METADATA_RUN = "airflow_run_id"
#: The last two are set by the sensor on batches it re-creates after the enqueued-token limit.
OWN_METADATA_KEYS = (
    METADATA_KEY,
    METADATA_CHUNK,
    METADATA_DAG,
    METADATA_TASK,
    METADATA_RUN,
    METADATA_FOLLOWS,
    METADATA_ATTEMPT,
)
#: The XCom key under which a table input's location is pushed (:meth:`TableSource.to_dict`), for collect.
TABLE_SOURCE_XCOM = "table_source"
#: ``input_format`` values: ``None`` tells a table from a JSONL file by its name (or a folder).
INPUT_FORMATS: tuple[str, ...] = ("jsonl", *TABLE_FORMATS)
#: The XCom key of the cost estimate made before upload (contract).
COST_ESTIMATE_XCOM = "cost_estimate"
#: Batches older than this are never reused: their input files may have expired at OpenAI.
MAX_REUSE_AGE_SECONDS = 30 * 86400


def idempotency_key(
    dag_id: str, task_id: str, run_id: str, map_index: int, chunk_index: int, content_sha256: str
) -> str:
    """A deterministic key for one chunk of one task instance (same inputs -> same key)."""
    raw = "\x1f".join([dag_id, task_id, run_id, str(map_index), str(chunk_index), content_sha256])
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def with_table_metadata(metadata: Mapping[str, str], source: TableSource) -> dict[str, str]:
    """``metadata`` and the two pairs that tell collect where the input table is.

    :raises OpenAIBatchInputError: they do not fit OpenAI's 16 pairs beside the operator's own, a user key
        has one of their names, or the table's location is too long for a metadata value.
    """
    try:
        pairs = source.to_metadata()
    except ValueError as err:
        raise OpenAIBatchInputError([InputProblem(None, "requests", str(err))]) from err
    room = MAX_METADATA_PAIRS - len(OWN_METADATA_KEYS) - len(pairs)
    problems = [
        InputProblem(None, f"metadata[{key!r}]", "this key is reserved by the operator for a table input")
        for key in metadata
        if key in pairs
    ]
    if len(metadata) > room:
        problems.append(
            InputProblem(
                None,
                "metadata",
                f"{len(metadata)} keys given; a table input leaves room for {room} beside the "
                f"{len(OWN_METADATA_KEYS) + len(pairs)} this operator adds "
                f"(OpenAI allows {MAX_METADATA_PAIRS})",
            )
        )
    if problems:
        raise OpenAIBatchInputError(problems)
    return {**metadata, **pairs}


def validate_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Check user metadata against OpenAI's limits, counting the keys this package adds."""
    metadata = dict(metadata or {})
    problems: list[InputProblem] = []
    room = MAX_METADATA_PAIRS - len(OWN_METADATA_KEYS)
    if len(metadata) > room:
        problems.append(
            InputProblem(
                None,
                "metadata",
                f"{len(metadata)} keys given; at most {room} fit beside the {len(OWN_METADATA_KEYS)} "
                f"this operator adds (OpenAI allows {MAX_METADATA_PAIRS})",
            )
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY_CHARS:
            problems.append(
                InputProblem(None, f"metadata[{key!r}]", f"keys must be 1-{MAX_METADATA_KEY_CHARS} chars")
            )
        if key in OWN_METADATA_KEYS:
            problems.append(InputProblem(None, f"metadata[{key!r}]", "this key is reserved by the operator"))
        if not isinstance(value, str):
            problems.append(InputProblem(None, f"metadata[{key!r}]", "values must be strings"))
        elif len(value) > MAX_METADATA_VALUE_CHARS:
            problems.append(
                InputProblem(
                    None,
                    f"metadata[{key!r}]",
                    f"value has {len(value)} chars; max {MAX_METADATA_VALUE_CHARS}",
                )
            )
    if problems:
        raise OpenAIBatchInputError(problems)
    return metadata


def validate_input_expires_after(value: Any) -> int | None:
    """``input_expires_after`` as whole seconds, or ``None``; outside OpenAI's range is an input error."""
    if value is None or value == "":
        return None
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        seconds = None
    if (
        seconds is None
        or isinstance(value, bool)
        or not (MIN_FILE_EXPIRES_AFTER <= seconds <= MAX_FILE_EXPIRES_AFTER)
    ):
        raise OpenAIBatchInputError(
            [
                InputProblem(
                    None,
                    "input_expires_after",
                    f"{value!r} is not a number of seconds from {MIN_FILE_EXPIRES_AFTER:,} (1 hour) to "
                    f"{MAX_FILE_EXPIRES_AFTER:,} (30 days)",
                )
            ]
        )
    return seconds


@contextmanager
def open_requests_file(source: Any) -> Any:
    """Open a JSONL source for binary streaming: local path, file://, s3://, gs://, or ObjectStoragePath."""
    if isinstance(source, Path):
        with source.open("rb") as stream:
            yield stream
        return
    text = str(source) if not isinstance(source, str) else source
    if "://" not in text and not hasattr(source, "fs"):
        with open(text, "rb") as stream:
            yield stream
        return
    from airflow_openai_batch.compat import ObjectStoragePath

    path = source if hasattr(source, "fs") else ObjectStoragePath(text)
    stream: IO[bytes]
    with path.open("rb") as stream:
        yield stream


def open_requests_table(source: Any, input_format: str | None = None) -> TableInput | None:
    """The table ``source`` names, opened for reading in record batches; ``None`` for a JSONL file.

    A table is told by ``input_format`` (``"parquet"`` / ``"csv"``; ``"jsonl"`` says it is none), else by
    the name's suffix (``.parquet``, ``.pq``, ``.parq``, ``.csv``), else by being a folder (its files'
    suffixes then tell the format).

    :param source: a local path, ``file://`` / ``s3://`` / ``gs://`` URI, or ObjectStoragePath.
    :param input_format: ``None`` (tell by the name), ``"jsonl"``, ``"parquet"`` or ``"csv"``.
    :raises OpenAIBatchInputError: an unknown ``input_format``, or nothing readable at ``source``.
    """
    if input_format in (None, ""):
        input_format = None
    elif input_format not in INPUT_FORMATS:
        raise OpenAIBatchInputError(
            [
                InputProblem(
                    None, "input_format", f"must be one of {INPUT_FORMATS} or None, not {input_format!r}"
                )
            ]
        )
    if input_format == "jsonl":
        return None
    remote = not isinstance(source, (str, Path)) or "://" in str(source)
    path: Any = None
    if remote:
        from airflow_openai_batch.compat import ObjectStoragePath

        path = source if hasattr(source, "fs") else ObjectStoragePath(str(source))
    table_kind = input_format or table_format(str(source))
    if table_kind is None:
        name = str(source).rstrip("/").rsplit("/", 1)[-1].lower()
        # A folder is a table (a JSONL input is one file): asked only of names that may be one.
        if name.endswith((".jsonl", ".ndjson", ".json")):
            return None
        if not (path.is_dir() if remote else Path(source).is_dir()):
            return None
    try:
        from airflow_openai_batch.core.tables import TableInput
    except ImportError as err:  # pyarrow is the optional ``parquet`` extra
        raise ImportError(
            f"{source} is a table input, which needs pyarrow: pip install 'airflow-openai-batch[parquet]'"
        ) from err
    if remote:
        return TableInput(path.path, filesystem=path.fs, format=input_format, uri=str(path))
    local = str(Path(source).absolute())
    return TableInput(local, format=input_format, uri=local)


def _usd_cap(name: str, value: Any) -> float | None:
    """A budget cap in USD (a templated one arrives as a string), or ``None``; anything else is an error."""
    if value is None or value == "":
        return None
    try:
        cap = float(value)
    except (TypeError, ValueError):
        cap = -1.0
    if isinstance(value, bool) or not cap >= 0:
        raise OpenAIBatchInputError(
            [InputProblem(None, name, f"must be a number of USD >= 0, got {value!r}")]
        )
    return cap


class OpenAIBatchSubmitOperator(BaseOperator):
    """Validate, split, upload and create OpenAI batches from a JSONL file or a list of requests.

    Every line is validated before anything is uploaded. The input is streamed and cut into the fewest
    batches that respect the limits (one model per batch). A retried or cleared task reuses the batches
    it already created (found by metadata), so nothing is paid twice.

    :param requests: a JSONL file (local path, ``file://``, ``s3://``, ``gs://`` URI or ObjectStoragePath),
        or a list of dicts: full request lines ``{custom_id, method, url, body}`` or ``{custom_id, body}``,
        or a Parquet or CSV table (a file or a folder of them, at any of those locations; needs the
        ``parquet`` extra): each row becomes one request, from ``id_column`` and ``prompt`` (or
        ``request_builder``). A table's location is pushed as XCom ``table_source`` for collect.
    :param input_format: ``None`` (the default) tells a table by its name (``.parquet``, ``.pq``,
        ``.parq``, ``.csv``) or by being a folder, anything else is JSONL; ``"parquet"``, ``"csv"`` or
        ``"jsonl"`` say it for a name that does not.
    :param id_column: a table's column whose values become ``custom_id`` (text or integers; unique and
        non-empty, or the error names the row).
    :param prompt: a Python format template over a table's columns, ``"Label this ticket:\\n{text}"``;
        it fills the endpoint's prompt field (chat: the user message; responses, embeddings, moderations:
        ``input``; completions: ``prompt``). Jinja renders it first, so ``{{ ds }}`` works beside
        ``{text}``; a literal brace for Python is written ``{{ '{{' }}`` / ``{{ '}}' }}`` there.
    :param system_prompt: a template too: chat's system message, responses' ``instructions``.
    :param body: a dict merged into every request body of a table (``temperature``,
        ``max_completion_tokens``...).
    :param request_builder: instead of ``prompt``, a callable ``row -> body`` (the row as a dict of all
        columns) for what a template cannot say; ``model`` and ``body`` are defaults under its keys.
    :param on_null: a null in a prompt column: ``"error"`` (names the row) or ``"empty"`` (reads ``""``).
    :param endpoint: the Batch endpoint, e.g. ``/v1/chat/completions``, ``/v1/embeddings``.
    :param model: fills ``body.model`` on lines that have none.
    :param completion_window: only ``24h`` exists today.
    :param metadata: string pairs added to every batch (the operator reserves seven keys of its own,
        so at most nine fit: OpenAI allows sixteen).
    :param max_requests_per_batch: cut batches at this many requests (OpenAI: 50,000).
    :param max_bytes_per_batch: cut batches at this many bytes of input file (OpenAI: 200 MB).
    :param output_expires_after: seconds after which OpenAI deletes the output files.
    :param input_expires_after: seconds after upload when OpenAI deletes the input files (3,600 to
        2,592,000; default OpenAI's 30 days). Re-created batches and retry rounds read the input file
        again, so it must outlive the last retry round.
    :param max_enqueued_tokens: cut batches so none holds more prompt tokens than this (counted exactly
        with the ``[tokens]`` extra, else estimated).
    :param response_schema: a Pydantic model class or a JSON Schema dict (``{"name", "schema"}`` or a bare
        schema), made strict-mode compatible and put into every line without a format of its own: chat
        completions ``response_format``, responses ``text.format``. Lines that keep their own format are
        counted in the log; any other endpoint is an input error before upload.
    :param max_cost_usd: raise :class:`~airflow_openai_batch.exceptions.OpenAIBatchBudgetError` before
        anything is uploaded when the estimate's upper bound (input, plus every line's output cap, or the
        model's output limit for a line without one) is above this many USD at batch prices.
    :param max_cost_usd_expected: the same for the expected cost (input plus a typical answer per line),
        for jobs whose outputs are unbounded.
    :param exact_token_count: count every line's prompt tokens with OpenAI's encoding (``[tokens]``
        extra). ``None`` (default): exactly when a cap (``max_cost_usd``, ``max_cost_usd_expected``,
        ``max_enqueued_tokens``) depends on it, else one line in 32 is counted and the rest estimated by
        bytes. The estimate is logged and pushed as XCom ``cost_estimate`` either way.
    :param prices: per-model price overrides for the estimate ``{model: {"input", "output", ...}}`` in USD
        per 1M tokens at batch prices, or a JSON file path (see the collect operator's ``prices``).
    :param conn_id: the ``openai_batch`` connection.
    :return: the batch ids, in chunk order. The job (every chunk, its input file and batch) is pushed as
        XCom ``job``: a chunk whose create call was refused for enqueued-token capacity (Azure) has no
        batch id yet, and the sensor, given this task's output, finds it there and creates it later.
    """

    template_fields: Sequence[str] = (
        "requests",
        "input_format",
        "id_column",
        "prompt",
        "system_prompt",
        "body",
        "endpoint",
        "model",
        "metadata",
        "max_requests_per_batch",
        "max_bytes_per_batch",
        "max_enqueued_tokens",
        "input_expires_after",
        "max_cost_usd",
        "max_cost_usd_expected",
    )
    template_fields_renderers = {"metadata": "json", "requests": "json", "body": "json"}
    operator_extra_links = (OpenAIBatchLink(), OpenAIBatchesPageLink())
    ui_color = "#d9f2e6"

    def __init__(
        self,
        *,
        requests: Any,
        endpoint: str = "/v1/chat/completions",
        model: str | None = None,
        completion_window: str = COMPLETION_WINDOW,
        metadata: Mapping[str, str] | None = None,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
        output_expires_after: int | None = None,
        max_enqueued_tokens: int | None = None,
        input_expires_after: int | None = None,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        input_format: str | None = None,
        id_column: str | None = None,
        prompt: str | None = None,
        system_prompt: str | None = None,
        body: Mapping[str, Any] | None = None,
        request_builder: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        on_null: str = "error",
        response_schema: Any = None,
        max_cost_usd: float | None = None,
        max_cost_usd_expected: float | None = None,
        exact_token_count: bool | None = None,
        prices: Mapping[str, Mapping[str, float]] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.requests = requests
        self.input_format = input_format
        self.id_column = id_column
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.body = body
        self.request_builder = request_builder
        self.on_null = on_null
        #: Where a table input is, once prepared (pushed as XCom ``table_source``).
        self._table_source: TableSource | None = None
        self.endpoint = endpoint
        self.model = model
        self.completion_window = completion_window
        self.metadata = metadata
        self.max_requests_per_batch = max_requests_per_batch
        self.max_bytes_per_batch = max_bytes_per_batch
        self.output_expires_after = output_expires_after
        self.max_enqueued_tokens = max_enqueued_tokens
        self.input_expires_after = input_expires_after
        self.conn_id = conn_id
        self.response_schema = response_schema
        self.max_cost_usd = max_cost_usd
        self.max_cost_usd_expected = max_cost_usd_expected
        self.exact_token_count = exact_token_count
        self.prices = prices

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(conn_id=self.conn_id)

    def execute(self, context: Context) -> list[str]:
        endpoint = normalize_endpoint(self.endpoint)
        user_metadata = validate_metadata(self.metadata)
        self.input_expires_after = validate_input_expires_after(self.input_expires_after)
        with task_work_dir(context, "submit") as work_dir:
            prepared = self._prepare(endpoint, work_dir)
            if self._table_source is not None:
                # Collect finds the table with each batch it reads: the user does not repeat it.
                user_metadata = with_table_metadata(user_metadata, self._table_source)
            self.log.info(
                "Validated %s requests (%s bytes) into %d batch(es) for %s",
                f"{prepared.total_requests:,}",
                f"{prepared.total_bytes:,}",
                len(prepared.chunks),
                endpoint,
            )
            self._check_cost(context, prepared)
            submitter = _ChunkSubmitter(self, context, endpoint, user_metadata, len(prepared.chunks))
            job = Job(chunks=[submitter.submit(chunk) for chunk in prepared.chunks])
        context["ti"].xcom_push(key="job", value=job.to_dict())
        if self._table_source is not None:
            context["ti"].xcom_push(key=TABLE_SOURCE_XCOM, value=self._table_source.to_dict())
        batch_ids = job.first_batch_ids()
        persist_batch_links(context, batch_ids)
        return batch_ids

    def _prepare(self, endpoint: str, work_dir: Path) -> PreparedInput:
        # Templated limits arrive as strings ("{{ params.x }}"): coerce once, here.
        self.max_cost_usd = _usd_cap("max_cost_usd", self.max_cost_usd)
        self.max_cost_usd_expected = _usd_cap("max_cost_usd_expected", self.max_cost_usd_expected)
        max_enqueued_tokens = int(self.max_enqueued_tokens) if self.max_enqueued_tokens else None
        limits: dict[str, Any] = {
            "endpoint": endpoint,
            "work_dir": work_dir,
            "model": self.model or None,
            "max_requests_per_batch": int(self.max_requests_per_batch),
            "max_bytes_per_batch": int(self.max_bytes_per_batch),
            "max_enqueued_tokens": max_enqueued_tokens,
            "response_schema": self.response_schema,
            "token_count": token_count_mode(
                self.exact_token_count, self.max_cost_usd, self.max_cost_usd_expected, max_enqueued_tokens
            ),
            "prices": self.prices,
        }
        if isinstance(self.requests, (list, tuple)):
            self._refuse_table_params("a list of requests")
            return prepare_from_records(self.requests, **limits)
        if self.requests is None or self.requests == "":
            raise OpenAIBatchInputError([InputProblem(None, "requests", "no input was given")])
        table = open_requests_table(self.requests, self.input_format or None)
        if table is not None:
            return self._prepare_table(table, limits)
        self._refuse_table_params(f"{self.requests} (read as JSONL)")
        with open_requests_file(self.requests) as stream:
            return prepare_from_lines(iter_lines(stream), **limits)

    def _check_cost(self, context: Context, prepared: PreparedInput) -> None:
        """Log the structured-answer count and the cost estimate, push it, and hold it to the caps."""
        if self.response_schema is not None:
            self.log.info(
                "response_schema put into %s requests; %s kept a format of their own",
                f"{prepared.total_requests - prepared.own_formats:,}",
                f"{prepared.own_formats:,}",
            )
        estimate = prepared.cost
        if estimate is None:
            return
        self.log.info("%s", estimate.table())
        context["ti"].xcom_push(key=COST_ESTIMATE_XCOM, value=estimate.to_dict())
        estimate.check_budget(self.max_cost_usd, self.max_cost_usd_expected)

    def _prepare_table(self, table: TableInput, limits: dict[str, Any]) -> PreparedInput:
        from airflow_openai_batch.core.tables import TableRequests, prepare_from_table

        requests = TableRequests(
            table,
            endpoint=limits["endpoint"],
            id_column=self.id_column or "",
            prompt=self.prompt,
            system_prompt=self.system_prompt,
            body=self.body,
            model=limits["model"],
            request_builder=self.request_builder,
            on_null=self.on_null,
        )
        # The same arguments as a JSONL file's prepare_from_lines call: one path into the splitter.
        prepared, self._table_source = prepare_from_table(requests, **limits)
        self.log.info(
            "Table %s (%s): %s rows -> requests, custom_id from column %r",
            self._table_source.uri,
            self._table_source.format,
            f"{self._table_source.row_count:,}",
            self._table_source.id_column,
        )
        return prepared

    def _refuse_table_params(self, what: str) -> None:
        """Table parameters given with an input that is no table: an error, not silently ignored."""
        params = {
            "id_column": self.id_column,
            "prompt": self.prompt,
            "system_prompt": self.system_prompt,
            "body": self.body,
            "request_builder": self.request_builder,
        }
        given = [name for name, value in params.items() if value not in (None, "", {})]
        if given:
            raise OpenAIBatchInputError(
                [
                    InputProblem(
                        None,
                        name,
                        f"applies to a table input (Parquet or CSV), but the input is {what}; "
                        "input_format='parquet' or 'csv' says a file is a table when its name does not",
                    )
                    for name in given
                ]
            )


class _ChunkSubmitter:
    """Creates (or finds again) the batch of each chunk for one task instance."""

    def __init__(
        self,
        operator: OpenAIBatchSubmitOperator,
        context: Context,
        endpoint: str,
        user_metadata: dict[str, str],
        chunk_count: int,
    ) -> None:
        self.operator = operator
        self.hook = operator.hook
        self.log = operator.log
        self.endpoint = endpoint
        self.user_metadata = user_metadata
        self.chunk_count = chunk_count
        ti = context["ti"]
        self.dag_id: str = ti.dag_id
        self.task_id: str = ti.task_id
        self.run_id: str = ti.run_id
        self.map_index: int = getattr(ti, "map_index", -1)
        # Absent before Airflow 3.3: the batches.list lookup below is then the only guard.
        self.state_store = task_state_store(context)
        self.reuse_cutoff = self._reuse_cutoff(context)
        self._existing: dict[str, list[Batch]] | None = None

    @staticmethod
    def _reuse_cutoff(context: Context) -> int:
        """Earliest created_at a batch of this run can have (bounds the batches.list walk)."""
        floor = int(time.time()) - MAX_REUSE_AGE_SECONDS
        dag_run = context.get("dag_run")
        run_after = getattr(dag_run, "run_after", None) if dag_run is not None else None
        if run_after is None:
            return floor
        return max(floor, int(run_after.timestamp()) - 3600)

    def submit(self, chunk: Chunk) -> JobChunk:
        key = idempotency_key(
            self.dag_id, self.task_id, self.run_id, self.map_index, chunk.index, chunk.sha256
        )
        found = self._find_reusable(key)
        if found is not None:
            self.log.info(
                "Chunk %d/%d: reusing batch %s (%s) created by an earlier attempt",
                chunk.index + 1,
                self.chunk_count,
                found.id,
                found.status,
            )
            self._remember(key, found.id)
            return JobChunk(key=key, attempts=[Attempt(batch_id=found.id, input_file_id=found.input_file_id)])
        file_id = self.hook.upload_file(
            chunk.path, filename=f"{key}.jsonl", expires_after=self.operator.input_expires_after
        ).id
        try:
            batch = self._create(key, chunk, file_id)
        except Exception as err:
            if not refused_for_capacity(err):
                raise
            # Azure (and the emulator's reject mode) refuse the create call when an enqueued token
            # or request limit is reached: not an error, the sensor creates this batch once capacity frees.
            self.log.warning(
                "Chunk %d/%d (file %s): create refused for now (%s); the sensor will create it "
                "when enqueued capacity frees",
                chunk.index + 1,
                self.chunk_count,
                file_id,
                describe_api_error(err),
            )
            spec = CreateSpec(
                input_file_id=file_id,
                endpoint=self.endpoint,
                completion_window=self.operator.completion_window,
                metadata=self._metadata(key, chunk),
                output_expires_after=self.operator.output_expires_after,
            )
            return JobChunk(key=key, attempts=[Attempt(input_file_id=file_id)], create=spec)
        self._remember(key, batch.id)
        self.log.info(
            "Chunk %d/%d: %s requests, %s bytes, ~%s prompt tokens, model %s -> file %s, batch %s",
            chunk.index + 1,
            self.chunk_count,
            f"{chunk.request_count:,}",
            f"{chunk.byte_count:,}",
            f"{chunk.estimated_tokens:,}",
            chunk.model,
            file_id,
            batch.id,
        )
        return JobChunk(key=key, attempts=[Attempt(batch_id=batch.id, input_file_id=file_id)])

    def _metadata(self, key: str, chunk: Chunk) -> dict[str, str]:
        return {
            **self.user_metadata,
            METADATA_KEY: key,
            METADATA_CHUNK: f"{chunk.index + 1}/{self.chunk_count}",
            METADATA_DAG: self.dag_id[:MAX_METADATA_VALUE_CHARS],
            METADATA_TASK: self.task_id[:MAX_METADATA_VALUE_CHARS],
            METADATA_RUN: self.run_id[:MAX_METADATA_VALUE_CHARS],
        }

    def _create(self, key: str, chunk: Chunk, file_id: str) -> Batch:
        return self.hook.create_batch_reconciled(
            lookup=(METADATA_KEY, key),
            input_file_id=file_id,
            endpoint=self.endpoint,
            completion_window=self.operator.completion_window,
            metadata=self._metadata(key, chunk),
            output_expires_after=self.operator.output_expires_after,
            is_reusable=lambda batch: batch.status in REUSABLE_STATUSES,
        )

    def _find_reusable(self, key: str) -> Batch | None:
        stored = self.state_store.get(key) if self.state_store is not None else None
        if isinstance(stored, str) and stored:
            batch = self.hook.get_batch(stored)
            if batch.status in REUSABLE_STATUSES:
                return batch
            self.log.info("Batch %s from an earlier attempt is %s; it will be replaced", stored, batch.status)
        for batch in self._existing_batches().get(key, []):
            if batch.status in REUSABLE_STATUSES:
                return batch
        return None

    def _existing_batches(self) -> dict[str, list[Batch]]:
        """This task instance's batches already at OpenAI, by idempotency key (one list walk per run)."""
        if self._existing is None:
            self._existing = {}
            for batch in self.hook.list_batches(created_after=self.reuse_cutoff):
                meta = batch.metadata or {}
                if meta.get(METADATA_DAG) == self.dag_id and meta.get(METADATA_RUN) == self.run_id:
                    self._existing.setdefault(meta.get(METADATA_KEY, ""), []).append(batch)
        return self._existing

    def _remember(self, key: str, batch_id: str) -> None:
        if self.state_store is not None:
            self.state_store.set(key, batch_id)

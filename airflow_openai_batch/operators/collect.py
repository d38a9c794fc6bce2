"""Collect operator: reconcile every request of the batches and land the results."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_openai_batch.compat import Asset, AssetAlias, BaseOperator
from airflow_openai_batch.core.batch_usage import batch_usage
from airflow_openai_batch.core.cost import PriceTable, usage_mismatch
from airflow_openai_batch.core.job import Attempt, Chunk, Job, read_job
from airflow_openai_batch.core.media import LocalMediaSink, MediaSink, ObjectStoreMediaSink
from airflow_openai_batch.core.reconcile import BatchResultFiles, Reconciler, present_file_id
from airflow_openai_batch.core.records import FailureColumns, SuccessColumns
from airflow_openai_batch.core.writers import OUTPUT_FORMATS, RecordSink, ResultWriter, write_manifest
from airflow_openai_batch.exceptions import (
    OpenAIBatchFailureRatioError,
    OpenAIBatchJoinError,
    OpenAIBatchXComLimitError,
)
from airflow_openai_batch.hooks.batch import OpenAIBatchHook
from airflow_openai_batch.links import OpenAIBatchesPageLink, OpenAIBatchLink, persist_batch_links
from airflow_openai_batch.operators._workdir import task_work_dir

if TYPE_CHECKING:
    from airflow_openai_batch.compat import Context
    from airflow_openai_batch.core.tables import JoinSummary, TableSource

#: The asset alias under which collect tasks announce the folders they write.
DEFAULT_ASSET_ALIAS = "openai_batch_results"
_PUBLISH_ORDER = ("successes", "failures", "retry_requests")


def batch_ids_from(value: Any) -> list[str]:
    """Batch ids from what upstream tasks return: one id, a list of ids, or the sensor's result dict."""
    return [a.batch_id for a in _answering_attempts(read_job(value)) if a.batch_id]


def _answering_attempts(job: Job) -> list[Attempt]:
    return [attempt for chunk in job.chunks for attempt in chunk.outcome_attempts()]


def batch_result_files(hook: OpenAIBatchHook, batch: Any) -> BatchResultFiles:
    """A final batch's status and its input, output and error files as line sources (read lazily)."""
    output_id = present_file_id(batch.output_file_id)
    error_id = present_file_id(batch.error_file_id)
    return BatchResultFiles(
        batch_id=batch.id,
        status=batch.status,
        input_lines=hook.iter_file_lines(batch.input_file_id),
        output_lines=hook.iter_file_lines(output_id) if output_id else None,
        error_lines=hook.iter_file_lines(error_id) if error_id else None,
        model=getattr(batch, "model", None),
    )


class _AnsweredIds(RecordSink):
    """Passes every record on to ``sink`` and notes the custom_ids answered while ``noting``.

    A retry batch holds just the requests an earlier batch of its chunk failed; the ids it answers are
    left out of the earlier batches (``skip_ids``), so each request is reported once, from its last
    attempt.
    """

    def __init__(self, sink: RecordSink) -> None:
        self.sink = sink
        self.takes_raw_json = sink.takes_raw_json
        self.takes_usage_counts = sink.takes_usage_counts
        self.noting = False
        self.ids: set[str] = set()

    def write_success(self, record: dict[str, Any]) -> None:
        if self.noting:
            self.ids.add(record["custom_id"])
        self.sink.write_success(record)

    def write_successes(self, successes: SuccessColumns) -> None:
        if self.noting:
            self.ids.update(successes.columns["custom_id"])
        self.sink.write_successes(successes)

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        if self.noting and record["custom_id"] is not None:
            self.ids.add(record["custom_id"])
        self.sink.write_failure(record, request_line)

    def write_failures(self, failures: FailureColumns) -> None:
        if self.noting:
            self.ids.update(cid for cid in failures.columns["custom_id"] if cid is not None)
        self.sink.write_failures(failures)

    def close(self) -> None:
        self.sink.close()

    def parsed_schema(self, schema: Mapping[str, Any] | None) -> None:
        self.sink.parsed_schema(schema)


class _XComSink(RecordSink):
    """Keeps records in memory for XCom, refusing past a limit (XCom lives in the metadata DB)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.successes: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []

    def _check(self) -> None:
        count = len(self.successes) + len(self.failures)
        if count > self.limit:
            raise OpenAIBatchXComLimitError(
                f"More than max_xcom_records={self.limit:,} records; set output_uri to write them to "
                "object storage instead (XCom lives in the metadata database)."
            )

    def write_success(self, record: dict[str, Any]) -> None:
        self.successes.append(record)
        self._check()

    def write_failure(self, record: dict[str, Any], request_line: bytes) -> None:
        self.failures.append(record)
        self._check()

    def close(self) -> None:
        pass


class OpenAIBatchCollectOperator(BaseOperator):
    """Stream and reconcile the results of batches: every input request lands exactly once.

    Successes get a ``content`` or ``embedding`` convenience field; failures carry an ``error_code``
    (the API's, or ``batch_expired``, ``batch_cancelled``, ``batch_failed``, ``missing``) and the
    original request, and go into ``retry_requests.jsonl``, a valid input for a new submit.

    :param batch_ids: a batch id, a list of ids, or the sensor's result dict (keyed by final batch ids).
    :param output_uri: folder for ``successes.<ext>``, ``failures.<ext>``, ``retry_requests.jsonl`` and
        ``manifest.json``: local path, ``file://``, ``s3://[conn@]bucket/prefix``, ``gs://``, or an
        ObjectStoragePath. ``None`` returns the records in the XCom summary instead.
    :param output_format: ``jsonl`` or ``parquet``.
    :param max_xcom_records: with ``output_uri=None``, more records than this is an error.
    :param fail_on_failure_ratio: after writing, fail the task when ``failed / total`` exceeds this.
    :param delete_remote_files: delete the batches' input/output/error files at OpenAI after a good write.
    :param prices: per-model price overrides ``{model: {"input", "output", "cached_input"}}`` in USD per
        1M tokens (batch prices).
    :param asset_alias: name of the AssetAlias the output folder is announced under.
    :param conn_id: the ``openai_batch`` connection.
    :param response_schema: a Pydantic model class or JSON Schema dict: chat and responses answers are
        validated against it instead of the schema each request asked for, and it types Parquet's
        ``parsed`` column.
    :param join_input: for batches submitted from a table, also write ``answers.<ext>``: one row per
        input row, in input order, with every input column and the answer columns. The table's location
        comes with the batches (submit puts it in their metadata).
    :param keep_columns: like ``join_input``, keeping only these input columns.
    :return: the summary (counts, failed_by_code, usage, usage_by_model, cost_by_model,
        estimated_cost_usd, URIs).
    """

    template_fields: Sequence[str] = ("batch_ids", "output_uri", "keep_columns")
    template_fields_renderers = {"batch_ids": "json"}
    operator_extra_links = (OpenAIBatchLink(), OpenAIBatchesPageLink())
    ui_color = "#e6f0ff"

    def __init__(
        self,
        *,
        batch_ids: Any,
        output_uri: Any = None,
        output_format: str = "jsonl",
        max_xcom_records: int = 1_000,
        fail_on_failure_ratio: float | None = None,
        delete_remote_files: bool = False,
        prices: Mapping[str, Mapping[str, float]] | None = None,
        asset_alias: str = DEFAULT_ASSET_ALIAS,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        response_schema: Any = None,
        join_input: bool = False,
        keep_columns: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {output_format!r}")
        kwargs.setdefault("outlets", [AssetAlias(asset_alias)])
        super().__init__(**kwargs)
        self.batch_ids = batch_ids
        self.output_uri = output_uri
        self.output_format = output_format
        self.max_xcom_records = max_xcom_records
        self.fail_on_failure_ratio = fail_on_failure_ratio
        self.delete_remote_files = delete_remote_files
        self.prices = prices
        self.asset_alias = asset_alias
        self.conn_id = conn_id
        self.response_schema = response_schema
        self.join_input = join_input
        self.keep_columns = keep_columns

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(conn_id=self.conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        self._usage_mismatches: list[str] = []
        job = read_job(self.batch_ids)
        ids = [a.batch_id for a in _answering_attempts(job) if a.batch_id]
        persist_batch_links(context, ids)
        batches = [self.hook.get_batch(batch_id) for batch_id in ids]
        by_id = {batch.id: batch for batch in batches}
        # Before any result is read: a join that cannot happen is the user's mistake, told at once.
        table_source = self._table_source(batches) if self.join_input or self.keep_columns else None
        with task_work_dir(context, "collect") as work_dir:
            if self.output_uri:
                sink: Any = ResultWriter(work_dir / "staging", self.output_format)
            else:
                sink = _XComSink(self.max_xcom_records)
            answered = _AnsweredIds(sink)
            # Images are written straight to their final place, before the files that point to them.
            media = _media_sink(self._output_folder()) if self.output_uri else None
            reconciler = Reconciler(answered, work_dir, response_schema=self.response_schema, media=media)
            try:
                for chunk in job.chunks:
                    self._collect_chunk(reconciler, answered, chunk, by_id)
                answered.close()
            except BaseException:
                if isinstance(sink, ResultWriter):
                    sink.abort()
                raise
            summary = self._summary(reconciler)
            if isinstance(sink, ResultWriter):
                if table_source is not None:
                    summary["answers"] = self._join(table_source, sink, work_dir)
                summary.update(self._publish(context, sink, summary))
            else:
                summary["successes"] = sink.successes
                summary["failures"] = sink.failures
        self._log_summary(summary)
        self._check_failure_ratio(summary)
        if self.delete_remote_files:
            self._delete_remote_files(batches)
        return summary

    def _collect_chunk(
        self, reconciler: Reconciler, answered: _AnsweredIds, chunk: Chunk, batches: Mapping[str, Any]
    ) -> None:
        """Reconcile a chunk's batches from its last attempt to its first, each request once."""
        attempts = chunk.outcome_attempts()
        answered.ids = set()
        for attempt in reversed(attempts):
            batch = batches[attempt.batch_id or ""]
            # Only a later attempt's ids are needed: the first attempt's are never skipped anywhere.
            answered.noting = attempt is not attempts[0]
            tally = reconciler.add_batch(
                batch_result_files(self.hook, batch), skip_ids=frozenset(answered.ids), attempt=attempt.number
            )
            mismatch = usage_mismatch(batch.id, batch_usage(batch.model_dump()), tally.usage)
            if mismatch:
                self.log.warning("%s", mismatch)
                self._usage_mismatches.append(mismatch)
            self.log.info(
                "Batch %s (%s%s): %s requests, %s succeeded, %s failed %s",
                batch.id,
                batch.status,
                f", attempt {attempt.number}, retries {attempt.retry_of}" if attempt.retry_of else "",
                f"{tally.total:,}",
                f"{tally.succeeded:,}",
                f"{tally.failed:,}",
                tally.failed_by_code or "",
            )
        answered.noting = False

    def _summary(self, reconciler: Reconciler) -> dict[str, Any]:
        result = reconciler.summary()
        data = result.to_dict()
        usage = data["usage"]
        prices = PriceTable.load(self.prices)
        return {
            "batch_ids": data["batch_ids"],
            "total": data["total"],
            "succeeded": data["succeeded"],
            "failed": data["failed"],
            "failed_by_code": data["failed_by_code"],
            "retried": data["retried"],
            "usage": {
                "input_tokens": usage.get("input_tokens", 0),
                "output_tokens": usage.get("output_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
                "cached_input_tokens": usage.get("cached_input_tokens", 0),
                "reasoning_tokens": usage.get("reasoning_tokens", 0),
            },
            "usage_by_model": data["usage_by_model"],
            "cost_by_model": prices.cost_by_model(result.usage_by_model),
            "cost_totals": prices.totals(result.usage_by_model),
            "estimated_cost_usd": prices.estimate_cost(result.usage_by_model),
            "usage_mismatches": list(self._usage_mismatches),
            "anomalies": data["anomalies"],
            "batches": data["batches"],
            "output_uri": None,
            "successes_uri": None,
            "failures_uri": None,
            "retry_requests_uri": None,
            "answers": None,
            "answers_uri": None,
        }

    def _publish(self, context: Context, writer: ResultWriter, summary: dict[str, Any]) -> dict[str, Any]:
        """Copy the staged files into ``output_uri``, the manifest last, and announce the folder."""
        folder = self._output_folder()
        folder.mkdir(parents=True, exist_ok=True)
        staged = writer.paths()
        answers = summary["answers"]
        if answers is not None:
            staged["answers"] = Path(answers["path"])
        uris: dict[str, Any] = {"output_uri": str(folder)}
        for name in (*_PUBLISH_ORDER, "answers"):
            if name not in staged:
                continue
            target = folder / staged[name].name
            _publish_file(staged[name], target)
            uris[f"{name}_uri"] = str(target)
        if answers is not None:
            answers["path"] = uris["answers_uri"]
        manifest = write_manifest(staged["successes"].parent, {**summary, **uris})
        _publish_file(manifest, folder / manifest.name)
        self.log.info("Results written to %s", folder)
        extra = {
            "total": summary["total"],
            "succeeded": summary["succeeded"],
            "failed": summary["failed"],
            **summary["cost_totals"],
        }
        try:
            context["outlet_events"][AssetAlias(self.asset_alias)].add(Asset(_asset_uri(folder)), extra=extra)
        except Exception as err:  # an odd URI must not fail a task whose results are written
            self.log.warning("Could not emit an asset event for %s: %s", folder, err)
        return uris

    def _table_source(self, batches: Sequence[Any]) -> TableSource:
        """Where the batches' input table is: submit wrote it into each batch's metadata."""
        from airflow_openai_batch.core.tables import TableSource

        if not self.output_uri:
            raise ValueError(
                "join_input / keep_columns write answers.<ext> beside the results: set output_uri"
            )
        for batch in batches:
            source = TableSource.from_metadata(batch.metadata)
            if source is not None:
                return source
        raise OpenAIBatchJoinError(
            f"join_input / keep_columns need batches submitted from a table, but none of the {len(batches)} "
            "batch(es) names one in its metadata (aob_table, aob_table_uri): were they submitted from a "
            "JSONL file or a list of requests?"
        )

    def _join(self, source: TableSource, writer: ResultWriter, work_dir: Path) -> dict[str, Any]:
        """Write ``answers.<ext>`` into the staging folder: the input table's rows with their answers."""
        from airflow_openai_batch.core.tables import TableInput, join_answers

        staged = writer.paths()
        ext = "parquet" if self.output_format == "parquet" else "jsonl"
        if "://" in source.uri:
            from airflow_openai_batch.compat import ObjectStoragePath

            location = ObjectStoragePath(source.uri)
            table = TableInput(location.path, filesystem=location.fs, format=source.format, uri=source.uri)
        else:
            table = TableInput(source.uri, format=source.format, uri=source.uri)
        joined: JoinSummary = join_answers(
            table,
            source,
            successes=staged["successes"],
            failures=staged["failures"],
            destination=staged["successes"].parent / f"answers.{ext}",
            keep_columns=None if self.join_input else list(self.keep_columns or ()),
            work_dir=work_dir / "join",
        )
        self.log.info(
            "Joined %s answers to the rows of %s: %s succeeded, %s failed",
            f"{joined.rows:,}",
            source.uri,
            f"{joined.succeeded:,}",
            f"{joined.failed:,}",
        )
        if joined.unanswered:
            self.log.warning(
                "%s rows of %s have no answer in these batches (status null in answers.%s): were some "
                "batches of the job left out of this collect?",
                f"{joined.unanswered:,}",
                source.uri,
                ext,
            )
        return {
            "path": str(joined.path),
            "rows": joined.rows,
            "succeeded": joined.succeeded,
            "failed": joined.failed,
            "unanswered": joined.unanswered,
            "columns": list(joined.columns),
        }

    def _output_folder(self) -> Any:
        """``output_uri`` as an ObjectStoragePath."""
        from airflow_openai_batch.compat import ObjectStoragePath

        folder = self.output_uri
        if not isinstance(folder, ObjectStoragePath):
            text = str(folder)
            # A bare local path becomes a file:// URI, so every URI in the summary has a scheme.
            folder = ObjectStoragePath(text if "://" in text else f"file://{Path(text).resolve()}")
        return folder

    def _log_summary(self, summary: dict[str, Any]) -> None:
        cost = summary["estimated_cost_usd"]
        self.log.info(
            "Collected %s requests: %s succeeded, %s failed %s; tokens in/out %s/%s "
            "(%s cached, %s reasoning); estimated cost %s",
            f"{summary['total']:,}",
            f"{summary['succeeded']:,}",
            f"{summary['failed']:,}",
            summary["failed_by_code"] or "",
            f"{summary['usage']['input_tokens']:,}",
            f"{summary['usage']['output_tokens']:,}",
            f"{summary['usage']['cached_input_tokens']:,}",
            f"{summary['usage']['reasoning_tokens']:,}",
            "unknown (model not in the price table)" if cost is None else f"${cost:,.4f}",
        )
        anomalies = summary["anomalies"]["counts"]
        if anomalies:
            self.log.warning("Result files had anomalies (reported, not merged): %s", anomalies)

    def _check_failure_ratio(self, summary: dict[str, Any]) -> None:
        if self.fail_on_failure_ratio is None or not summary["total"]:
            return
        ratio = summary["failed"] / summary["total"]
        if ratio > self.fail_on_failure_ratio:
            raise OpenAIBatchFailureRatioError(
                f"{summary['failed']:,} of {summary['total']:,} requests failed ({ratio:.1%}), above "
                f"fail_on_failure_ratio={self.fail_on_failure_ratio:.1%}; results were written "
                f"({summary['failures_uri'] or 'XCom'}). Failures by code: {summary['failed_by_code']}",
                {bid: None for bid in summary["batch_ids"]},
            )

    def _delete_remote_files(self, batches: list[Any]) -> None:
        for batch in batches:
            for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
                file_id = present_file_id(file_id)
                if not file_id:
                    continue
                try:
                    self.hook.delete_file(file_id)
                    self.log.info("Deleted file %s of batch %s at OpenAI", file_id, batch.id)
                except Exception as err:  # results are safe; a leftover file only costs storage
                    self.log.warning("Could not delete file %s of batch %s: %s", file_id, batch.id, err)


def _publish_file(source: Path, target: Any) -> None:
    """Copy a local file to its destination so a reader never sees a half-written file.

    Object stores make an object visible only when its upload completes; on a local filesystem the
    copy goes to ``<name>.partial`` first and is renamed into place.
    """
    if str(target).startswith("file://"):
        final = Path(target.path)
        partial = final.with_name(final.name + ".partial")
        shutil.copyfile(source, partial)
        partial.replace(final)
        return
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _media_sink(folder: Any) -> MediaSink:
    """Where images go: a local folder is written file by file with a rename, an object store directly."""
    if str(folder).startswith("file://"):
        return LocalMediaSink(folder.path, uri_prefix=str(folder))
    return ObjectStoreMediaSink(folder)


def _asset_uri(folder: Any) -> str:
    """An asset URI for the output folder, without the connection id (``s3://conn@bucket/...``)."""
    scheme, _, rest = str(folder).partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"

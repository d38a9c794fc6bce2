"""The one place for OpenAI Batch API limits and defaults.

Every other module reads limits from here, so a change at OpenAI is a one-line change.
No Airflow import: the core modules and the emulator's tests use these too.
"""

from __future__ import annotations

#: Requests in one batch input file.
MAX_REQUESTS_PER_BATCH = 50_000
#: Bytes in one batch input file.
MAX_BYTES_PER_BATCH = 200_000_000
#: Embedding inputs across all requests of one /v1/embeddings batch.
MAX_EMBEDDING_INPUTS_PER_BATCH = 50_000
#: Batch metadata: pairs, key length, value length.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
#: batches.list page size bounds.
MAX_LIST_PAGE_SIZE = 100
#: Bounds of a file's ``expires_after.seconds`` (input files at upload, output files at batch create).
MIN_FILE_EXPIRES_AFTER = 3_600
MAX_FILE_EXPIRES_AFTER = 2_592_000
#: Requests an organisation may have enqueued per embeddings model (besides the enqueued-token cap);
#: batches beyond it fail with "Enqueued request limit reached". Submit cuts at it when asked to, the
#: sensor re-creates batches that failed for it, as for the token cap.
MAX_ENQUEUED_EMBEDDING_REQUESTS = 1_000_000

COMPLETION_WINDOW = "24h"

#: Endpoints the Batch API accepts (OpenAI spelling, with the /v1 prefix).
BATCH_ENDPOINTS: tuple[str, ...] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
)
#: Endpoints the Batch API no longer accepts, and why (submit names the reason before uploading).
RETIRED_BATCH_ENDPOINTS: dict[str, str] = {
    "/v1/videos": "OpenAI shut the Videos API (Sora) down on 2026-09-24; batches.create no longer accepts it",
}

EMBEDDINGS_ENDPOINT = "/v1/embeddings"

#: Endpoints whose API supplies a model when a request names none, and that model: their lines may leave
#: ``body.model`` out and are grouped under it. (The image endpoints have a default too, but which one
#: depends on the other parameters, so their lines must name a model.)
API_DEFAULT_MODELS: dict[str, str] = {"/v1/moderations": "omni-moderation-latest"}

#: JSON nested deeper than this in a request line is refused before upload: the parsers that read the line
#: after submit (the API's; orjson, in collect and the emulator, stops at 1024) refuse such lines too.
MAX_JSON_NESTING = 1000

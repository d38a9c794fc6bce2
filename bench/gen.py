"""Deterministic input generators: chat request JSONL and batch result files (output + error).

Everything is generated into a temporary directory outside the repository, once per ``make bench`` run,
and deleted afterwards. Lines are built from byte templates (fast) and are shaped like the real thing:
requests as the Batch guide writes them, result lines as OpenAI returns them.
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"

_WORDS = (
    b"invoice refund order delivery late package account password login error charge card "
    b"subscription cancel upgrade plan billing address shipping tracking broken damaged missing "
    b"item support ticket urgent please help thanks again hello team issue problem app crash "
    b"update version feature request export report email notification settings"
).split()

_REQUEST_TAIL = (
    b'","method":"POST","url":"/v1/chat/completions","body":{"model":"'
    + MODEL.encode()
    + b'","messages":[{"role":"system","content":"Label the support ticket."},'
    b'{"role":"user","content":"%s"}],"max_tokens":50}}\n'
)
_REQUEST = b'{"custom_id":"req-%09d' + _REQUEST_TAIL
#: A Responses API request (``write_results(..., endpoint="responses")``).
_RESPONSES_REQUEST = (
    b'{"custom_id":"req-%09d","method":"POST","url":"/v1/responses","body":{"model":"'
    + MODEL.encode()
    + b'","instructions":"Label the support ticket.","input":"%s","max_output_tokens":50}}\n'
)
#: The same request with a random 32-hex-digit custom_id (a UUID), so ids do not come in order.
_REQUEST_RANDOM_ID = b'{"custom_id":"%s' + _REQUEST_TAIL

_OUTPUT = (
    b'{"id":"batch_req_%032x","custom_id":"req-%09d","response":{"status_code":200,'
    b'"request_id":"%032x","body":{"id":"chatcmpl-%029x","object":"chat.completion",'
    b'"created":1764000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"%s","refusal":null,"annotations":[]},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":'
    b'{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
    b'"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_b8bc95a0ac"}},'
    b'"error":null}\n'
)

#: A Responses API answer as the Batch API returns it: a message item whose one part carries (empty)
#: annotations and logprobs, usage in the Responses API's names.
_RESPONSES_OUTPUT = (
    b'{"id":"batch_req_%032x","custom_id":"req-%09d","response":{"status_code":200,'
    b'"request_id":"%032x","body":{"id":"resp_%029x","object":"response","created_at":1764000000,'
    b'"status":"completed","error":null,"incomplete_details":null,"instructions":"Label the support '
    b'ticket.","max_output_tokens":50,"model":"gpt-4o-mini-2024-07-18","output":[{"id":"msg_%029x",'
    b'"type":"message","status":"completed","role":"assistant","content":[{"type":"output_text",'
    b'"annotations":[],"logprobs":[],"text":"%s"}]}],"parallel_tool_calls":true,'
    b'"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"service_tier":"default",'
    b'"store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},'
    b'"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":%d,'
    b'"input_tokens_details":{"cached_tokens":0},"output_tokens":%d,"output_tokens_details":'
    b'{"reasoning_tokens":0},"total_tokens":%d},"user":null,"metadata":{}}},"error":null}\n'
)

_ERROR_HTTP = (
    b'{"id":"batch_req_%032x","custom_id":"req-%09d","response":{"status_code":400,'
    b'"request_id":"%032x","body":{"error":{"message":"Invalid value for max_tokens.",'
    b'"type":"invalid_request_error","param":"max_tokens","code":"invalid_value"}}},"error":null}\n'
)

_ERROR_NON_HTTP = (
    b'{"id":"batch_req_%032x","custom_id":"req-%09d","response":null,'
    b'"error":{"code":"internal_error","message":"The request could not be processed."}}\n'
)


def _text(rng: random.Random, low: int, high: int) -> bytes:
    words = rng.choices(_WORDS, k=rng.randint(low, high))
    return b" ".join(words)


def write_requests(
    path: Path, lines: int, seed: int = 1, random_ids: bool = False, endpoint: str = "chat"
) -> int:
    """Write ``lines`` request lines (chat: about 270 bytes each; unique custom_ids); return the bytes.

    :param random_ids: UUID-like custom_ids in random order instead of ``req-000000001``...
    :param endpoint: ``"chat"``, or ``"responses"`` for Responses API requests (ids in order).
    """
    rng = random.Random(seed)
    # A pool of texts reused round-robin: generating is not what is measured, and lines still differ.
    pool = [_text(rng, 2, 12) for _ in range(4096)]
    written = 0
    with open(path, "wb", buffering=1 << 20) as out:
        block: list[bytes] = []
        for i in range(lines):
            text = pool[(i * 7919) % 4096]
            if endpoint == "responses":
                block.append(_RESPONSES_REQUEST % (i, text))
            elif random_ids:
                block.append(_REQUEST_RANDOM_ID % (b"%032x" % rng.getrandbits(128), text))
            else:
                block.append(_REQUEST % (i, text))
            if len(block) == 8192:
                data = b"".join(block)
                out.write(data)
                written += len(data)
                block.clear()
        data = b"".join(block)
        out.write(data)
        written += len(data)
    return written


def write_results(
    folder: Path, requests: int, failure_rate: float = 0.05, seed: int = 2, endpoint: str = "chat"
) -> dict[str, Path]:
    """Write one batch's three files: ``input.jsonl``, ``output.jsonl`` and ``error.jsonl``.

    Result lines are shuffled (OpenAI does not keep the input order); ``failure_rate`` of the requests
    are in the error file (half HTTP 400, half non-HTTP errors).

    :param endpoint: ``"chat"`` (chat completions) or ``"responses"`` (the Responses API).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.jsonl" for name in ("input", "output", "error")}
    write_requests(paths["input"], requests, seed=seed, endpoint=endpoint)
    answer = _RESPONSES_OUTPUT if endpoint == "responses" else _OUTPUT
    rng = random.Random(seed)
    replies = [_text(rng, 4, 30) for _ in range(2048)]
    order = list(range(requests))
    rng.shuffle(order)
    with open(paths["output"], "wb", buffering=1 << 20) as out, open(paths["error"], "wb") as err:
        for i in order:
            r = rng.random()
            if r < failure_rate / 2:
                err.write(_ERROR_HTTP % (i, i, i * 31))
            elif r < failure_rate:
                err.write(_ERROR_NON_HTTP % (i, i))
            else:
                prompt = 20 + i % 50
                completion = 5 + i % 40
                ids = (i, i, i * 31, i * 17) if answer is _OUTPUT else (i, i, i * 31, i * 17, i * 13)
                out.write(answer % (*ids, replies[i % 2048], prompt, completion, prompt + completion))
    return paths


def check_templates() -> None:
    """Fail fast if a template is not valid JSON."""
    rng = random.Random(0)
    orjson.loads(_REQUEST % (1, _text(rng, 2, 12)))
    orjson.loads(_REQUEST_RANDOM_ID % (b"ab" * 16, _text(rng, 2, 12)))
    orjson.loads(_OUTPUT % (1, 1, 1, 1, b"hi", 1, 2, 3))
    orjson.loads(_ERROR_HTTP % (1, 1, 1))
    orjson.loads(_ERROR_NON_HTTP % (1, 1))

"""Hostile JSONL input: accepted and round-tripped with nothing lost, or rejected before any upload.

Hypothesis builds files from clean request lines (odd unicode, escaped NULs, nested bodies, huge lines,
reordered keys, padding), blank lines, CRLF endings, a leading BOM, and junk: truncated lines, non-JSON,
non-objects, bad custom_ids, raw NUL bytes, a BOM in the middle, invalid UTF-8, duplicate ids far apart,
streaming requests. Some lines are legitimately either way (escaped lone surrogates, nesting deeper than
parsers allow). The oracle: a file with junk is rejected with an ``OpenAIBatchInputError`` naming
exactly the bad lines (a duplicate: its later line), and the emulator saw no upload and no batch; a
file without junk is accepted, and collect returns every custom_id exactly once.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_openai_batch.exceptions import OpenAIBatchInputError
from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
from tests.support.reliability.helpers import CHAT, report
from tests.support.reliability.worker import make_context

CLEAN_KINDS = ("valid",) * 6 + (
    "unicode_raw",
    "reordered",
    "padded",
    "nul_escaped",
    "nested",
    "huge",
    "blank",
)
JUNK_KINDS = (
    "truncated",
    "not_json",
    "non_object",
    "bad_custom_id",
    "nul_raw",
    "bom_mid",
    "bad_utf8",
    "duplicate",
    "streaming",
    "wrong_url",
)
EITHER_KINDS = ("surrogate_id", "too_deep")
ODD_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12
)  # controls, NUL, RTL marks, combining accents, emoji, private use...
TALLY: Counter = Counter()


@dataclass
class HostileFile:
    data: bytes
    #: 1-based physical line numbers -> kind
    kinds: dict[int, str] = field(default_factory=dict)
    #: custom_ids of the clean request lines, in order
    expected_ids: list[str] = field(default_factory=list)
    #: custom_ids of the lines a parser may accept or refuse
    either_ids: list[str] = field(default_factory=list)

    def lines_of(self, group: tuple[str, ...]) -> set[int]:
        return {n for n, kind in self.kinds.items() if kind in group}


def request(custom_id: Any, content: Any = "hi", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body},
    }


def dumps(obj: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def hostile_files(draw: Any) -> HostileFile:
    count = draw(st.integers(min_value=1, max_value=22))
    # Half the files are hostile throughout; the other half have only clean lines (so they must pass).
    pool = CLEAN_KINDS * 3 + JUNK_KINDS + EITHER_KINDS if draw(st.booleans()) else CLEAN_KINDS
    kinds = draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count))
    out = HostileFile(b"")
    lines: list[bytes] = []
    huge = 0
    for position, kind in enumerate(kinds):
        n = position + 1
        unique = f"{draw(ODD_TEXT)}#{n}"
        text = draw(ODD_TEXT)
        if kind == "huge" and huge >= 2:
            kind = "valid"
        if kind == "duplicate" and not out.expected_ids:
            kind = "valid"
        if kind == "bom_mid" and n == 1:
            kind = "valid"
        line: bytes
        if kind == "valid":
            line = dumps(request(unique, text))
        elif kind == "unicode_raw":
            line = dumps(request(unique, f"{text} é 漢字 🚀 \u200f\u0301"), ascii_only=False)
        elif kind == "reordered":
            obj = request(unique, text)
            line = dumps({"body": obj["body"], "url": CHAT, "custom_id": unique, "method": "POST"})
        elif kind == "padded":
            line = b" \t " + dumps(request(unique, text)) + b" \t"
        elif kind == "nul_escaped":
            line = dumps(request(unique, f"a\u0000b{text}\u0000"))
        elif kind == "nested":
            depth = draw(st.integers(min_value=1, max_value=200))
            junk: Any = {"k": text}
            for _ in range(depth):
                junk = [junk, {"": None, "\u0000": [True, 1.5e300, -0.0]}]
            line = dumps(request(unique, text, metadata_junk=junk))
        elif kind == "huge":
            huge += 1
            size = draw(st.integers(min_value=100_000, max_value=400_000))
            line = dumps(request(unique, (text + " ") * (size // (len(text) + 1))))
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b" ", b"\t", b"   \t  "]))
        elif kind == "truncated":
            full = dumps(request(unique, text))
            line = full[: draw(st.integers(min_value=1, max_value=len(full) - 1))]
        elif kind == "not_json":
            line = draw(st.sampled_from([b"hello", b"{'custom_id': 'x'}", b"{", b"}", b"NaN]", b"\\"]))
        elif kind == "non_object":
            line = draw(st.sampled_from([b"[1, 2]", b"null", b"42", b'"text"', b"[]", b"true"]))
        elif kind == "bad_custom_id":
            bad = draw(st.sampled_from([5, "", None, ["x"], {"id": "x"}, "missing"]))
            obj = request(bad, text)
            if bad == "missing":
                del obj["custom_id"]
            line = dumps(obj)
        elif kind == "nul_raw":
            full = dumps(request(unique, text))
            cut = draw(st.integers(min_value=1, max_value=len(full) - 1))
            line = full[:cut] + b"\x00" + full[cut:]
        elif kind == "bom_mid":
            line = b"\xef\xbb\xbf" + dumps(request(unique, text))
        elif kind == "bad_utf8":
            line = dumps(request(unique, "BROKEN")).replace(b"BROKEN", b"BR\xff\xfeOKEN")
        elif kind == "duplicate":
            line = dumps(request(draw(st.sampled_from(out.expected_ids)), text))
        elif kind == "streaming":
            line = dumps(request(unique, text, stream=True))
        elif kind == "wrong_url":
            obj = request(unique, text)
            obj["url"] = draw(st.sampled_from(["/v1/embeddings", "/v1/chat/completions/", "", "v1"]))
            line = dumps(obj)
        elif kind == "surrogate_id":
            line = dumps(request(f"{unique}\ud800", text))  # escaped as \ud800: valid JSON, odd string
        elif kind == "too_deep":
            line = dumps(request(unique, "DEEP")).replace(b'"DEEP"', b"[" * 1500 + b"]" * 1500)
        else:  # pragma: no cover
            raise AssertionError(kind)
        if kind in ("valid", "unicode_raw", "reordered", "padded", "nul_escaped", "nested", "huge"):
            out.expected_ids.append(unique)
        elif kind in EITHER_KINDS:
            out.either_ids.append(f"{unique}\ud800" if kind == "surrogate_id" else unique)
        out.kinds[n] = kind
        lines.append(line)
    endings = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=count, max_size=count))
    data = b"".join(line + end for line, end in zip(lines, endings, strict=True))
    if draw(st.booleans()):
        data = data.removesuffix(b"\r\n").removesuffix(b"\n")  # no newline at the end of the file
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # a BOM at the very start is allowed
    out.data = data
    return out


def named_lines(err: OpenAIBatchInputError) -> set[int]:
    return {p.line for p in err.problems if p.line is not None}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(hostile=hostile_files())
def test_hostile_input_is_round_tripped_or_rejected_naming_the_lines(emulator, tmp_path, hostile) -> None:
    emulator.reset()
    emulator.configure(time_scale=0.0, failure_rate=0.2, missing_rate=0.05)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(hostile.data)
    junk = hostile.lines_of(JUNK_KINDS)
    either = hostile.lines_of(EITHER_KINDS)
    spec = {"dag_id": "reliability_fuzz", "run_id": "fuzz", "run_after": time.time() - 60}
    op = OpenAIBatchSubmitOperator(task_id="submit", requests=str(path), max_requests_per_batch=7)
    try:
        ids = op.execute(make_context({**spec, "task_id": "submit"}))
    except OpenAIBatchInputError as err:
        stats = emulator.stats()
        assert stats["files.create"] == stats["files"] == stats["batches"] == 0, "uploaded before rejecting"
        named = named_lines(err)
        if not hostile.expected_ids and not junk and not either:
            assert "empty" in str(err).lower()
        else:
            assert named, f"rejected without naming a line: {err}"
            assert named <= junk | either, f"named clean lines {sorted(named - junk - either)}: {err}"
            assert junk <= named, f"did not name the bad lines {sorted(junk - named)}: {err}"
            assert all(re.search(rf"\bline {n}\b", str(err)) for n in named)
        TALLY["rejected"] += 1
        TALLY["bad_lines_named"] += len(named)
        return
    assert not junk, f"accepted an input with bad lines {sorted((n, hostile.kinds[n]) for n in junk)}"
    emulator.advance(3600)
    summary = OpenAIBatchCollectOperator(task_id="collect", batch_ids=ids, max_xcom_records=10_000).execute(
        make_context({**spec, "task_id": "collect"})
    )
    seen = Counter(r["custom_id"] for r in summary["successes"] + summary["failures"])
    expected = hostile.expected_ids + hostile.either_ids
    assert seen == Counter(expected), "a request was lost, duplicated or altered"
    assert summary["total"] == len(expected) == summary["succeeded"] + summary["failed"]
    TALLY["accepted"] += 1
    TALLY["requests_round_tripped"] += len(expected)
    TALLY["bytes_max"] = max(TALLY["bytes_max"], len(hostile.data))


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Any:
    TALLY.clear()
    yield
    report("hostile JSONL fuzz", **dict(sorted(TALLY.items())))

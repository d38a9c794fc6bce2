"""Bookkeeping for batches that hit the enqueued-token limit (no Airflow import).

OpenAI caps the prompt tokens an organisation may have enqueued per model. Batches beyond the cap are
created and then go ``failed`` with ``token_limit_exceeded`` (Azure may instead refuse the create
call). Such a chunk is not lost: it is re-created from the same input file once capacity frees. This
module holds the plain-data side of that: recognising the failure, the per-chunk chain of attempts
carried across deferrals, and the ``pending:`` placeholder for a chunk whose create was refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Error codes (batch ``errors`` or a refused create call) that mean "no capacity yet, try later".
CAPACITY_ERROR_CODES = frozenset({"token_limit_exceeded", "request_limit_exceeded"})
#: Placeholder prefix, in a submit's returned ids, for a chunk uploaded but not yet created.
PENDING_PREFIX = "pending:"
#: Metadata keys on re-created batches: the chain they belong to and their attempt number.
METADATA_ORIGIN = "aob_origin"
METADATA_ATTEMPT = "aob_attempt"


def is_capacity_error(code: Any, message: Any = "") -> bool:
    """True for an enqueued token (or request) limit error, whatever field carries it."""
    if isinstance(code, str) and code in CAPACITY_ERROR_CODES:
        return True
    text = str(message or "").lower()
    return "enqueued" in text and "limit" in text


def is_capacity_failure(summary: Mapping[str, Any]) -> bool:
    """A batch summary that ended ``failed`` only because the enqueued limit was reached."""
    if summary.get("status") != "failed":
        return False
    return any(is_capacity_error(e.get("code"), e.get("message")) for e in summary.get("errors") or ())


@dataclass
class CreateSpec:
    """What ``batches.create`` needs to (re-)create a chunk's batch.

    :param input_file_id: the uploaded input file, reused by every attempt.
    :param endpoint: the batch endpoint.
    :param completion_window: ``24h``.
    :param metadata: the batch metadata (the chain keys are added per attempt).
    :param output_expires_after: seconds, or ``None``.
    """

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] = field(default_factory=dict)
    output_expires_after: int | None = None


def encode_pending(spec: CreateSpec) -> str:
    """The placeholder a submit returns for a chunk whose create call was refused for capacity."""
    return PENDING_PREFIX + json.dumps(asdict(spec), sort_keys=True, separators=(",", ":"))


def is_pending(batch_id: str) -> bool:
    return batch_id.startswith(PENDING_PREFIX)


def decode_pending(placeholder: str) -> CreateSpec:
    if not is_pending(placeholder):
        raise ValueError(f"not a pending placeholder: {placeholder[:80]!r}")
    return CreateSpec(**json.loads(placeholder[len(PENDING_PREFIX) :]))


@dataclass
class Chain:
    """One chunk's batches over time: the current one, the ones it replaced, and the attempts used.

    :param origin: stable id of the chunk (its submit idempotency key, else its first batch id).
    :param current: the batch id waited on now, or a ``pending:`` placeholder while not created.
    :param replaces: earlier batch ids of this chunk, oldest first.
    :param attempts: re-creations made so far.
    """

    origin: str
    current: str
    replaces: list[str] = field(default_factory=list)
    attempts: int = 0

    @property
    def pending(self) -> bool:
        return is_pending(self.current)

    def advance(self, new_current: str) -> None:
        """Record a re-creation: ``new_current`` replaces the current batch (placeholders are not kept)."""
        if not self.pending:
            self.replaces.append(self.current)
        self.current = new_current
        self.attempts += 1


@dataclass
class JobState:
    """Everything the sensor must carry across deferrals (JSON-safe via :meth:`to_dict`).

    :param chains: one per chunk, in chunk order.
    :param deadline: absolute unix time at which the wait ends.
    :param started_at: unix time the wait began.
    :param idle_rounds: consecutive re-creation rounds with nothing of the job running (for backoff).
    """

    chains: list[Chain]
    deadline: float
    started_at: float
    idle_rounds: int = 0

    @classmethod
    def start(
        cls, ids: Iterable[str], replaces: Mapping[str, list[str]], deadline: float, started_at: float
    ) -> JobState:
        chains = [Chain(origin=i, current=i, replaces=list(replaces.get(i, []))) for i in ids]
        for chain in chains:
            if chain.pending:
                spec = decode_pending(chain.current)
                chain.origin = spec.metadata.get("aob_key") or spec.input_file_id
        return cls(chains=chains, deadline=deadline, started_at=started_at)

    @property
    def batch_ids(self) -> list[str]:
        """The batches to poll: every current id that is a real batch."""
        return [c.current for c in self.chains if not c.pending]

    @property
    def pending(self) -> list[Chain]:
        return [c for c in self.chains if c.pending]

    def replaces(self) -> dict[str, list[str]]:
        return {c.current: list(c.replaces) for c in self.chains if not c.pending}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobState:
        chains = [Chain(**c) for c in data["chains"]]
        return cls(
            chains=chains,
            deadline=float(data["deadline"]),
            started_at=float(data["started_at"]),
            idle_rounds=int(data.get("idle_rounds", 0)),
        )


def may_create(chain: Chain, max_resubmits: int) -> bool:
    """Whether a chain may get another batch: re-creations are capped, a first creation is not."""
    return chain.attempts < max_resubmits or (chain.pending and chain.attempts == 0)


def waiting_chains(
    state: JobState, summaries: Mapping[str, Mapping[str, Any]], max_resubmits: int
) -> list[Chain]:
    """Chains that need a (re-)creation and may still get one: pending, or failed for capacity."""
    return [
        c
        for c in state.chains
        if (c.pending or is_capacity_failure(summaries.get(c.current, {}))) and may_create(c, max_resubmits)
    ]


def exhausted_chains(
    state: JobState, summaries: Mapping[str, Mapping[str, Any]], max_resubmits: int
) -> list[Chain]:
    """Chains stuck on the capacity limit with no attempt left."""
    return [
        c
        for c in state.chains
        if (c.pending or is_capacity_failure(summaries.get(c.current, {})))
        and not may_create(c, max_resubmits)
    ]


def idle_backoff(idle_rounds: int, base: float, cap: float) -> float:
    """Wait before re-creating when nothing of the job runs (other jobs may hold the capacity)."""
    return min(cap, base * (2 ** max(0, idle_rounds)))

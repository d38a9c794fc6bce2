"""Shared polls for the triggers of one triggerer: one poll board per event loop and connection.

A triggerer runs every deferred task's trigger in one event loop. Left alone, 1,000 triggers that each
wait on one batch make 1,000 ``batches.retrieve`` calls per round of polls. With the board they share:
a trigger asks the board for the current state of its batches, and the requests that arrive together
(within :data:`COALESCE_SECONDS` of each other, up to :data:`MAX_COALESCE_SECONDS`) are served together,
by a ``batches.list`` walk (up to 100 batches per call, newest first) when that costs fewer calls than
one retrieve per batch, and by retrieves otherwise and for whatever the walk did not find. Triggers meet
in the same round because they align their polls on a grid in absolute time
(:func:`~airflow_openai_batch.core.progress.align_to_grid`).

A walk reads its pages at once, not one after the other: the board remembers where each page of the
last walk ended, and those batch ids are the cursors (``after``) of the next walk's pages. Batches are
listed newest first and only new ones are added (at the front), so the pages still cover the list; the
few batches pushed past the first page by new ones are read on from it. Pages are parsed as plain JSON:
a trigger needs a handful of fields, not the SDK's models.

The board owns one async client per (event loop, connection), shared by its triggers (one connection
pool instead of one per trigger), and closes it once the last trigger has left.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from airflow_openai_batch.core.progress import classify_api_error, describe_api_error
from airflow_openai_batch.limits import MAX_LIST_PAGE_SIZE
from airflow_openai_batch.statuses import is_final

__all__ = [
    "COALESCE_SECONDS",
    "LIST_MIN_IDS",
    "MAX_COALESCE_SECONDS",
    "MAX_CONCURRENT_CALLS",
    "PollBoard",
    "join",
    "open_boards",
]

log = logging.getLogger(__name__)

#: Real seconds a round stays open to more requests after its first one, and again after each one that
#: came meanwhile. Triggers aligned on the same grid point wake within a millisecond or two of each other;
#: 20 ms gathers them at a negligible cost in latency. A module-level value so tests can change it.
COALESCE_SECONDS = 0.02
#: The longest a round stays open while requests keep coming (many triggers starting at once).
MAX_COALESCE_SECONDS = 0.25
#: Event-loop turns a round also stays open: coroutines woken in the same loop pass (a virtual clock
#: waking every waiter due at one instant) all get their turn, even with :data:`COALESCE_SECONDS` at 0.
COALESCE_TURNS = 3
#: Fewer wanted batches than this are always retrieved one by one: a walk could save a few calls at
#: best, and a page carries up to 100 batches to parse. So a trigger alone polls exactly as before.
LIST_MIN_IDS = 8
#: Batches per ``batches.list`` page: the API's maximum, so a walk needs as few calls as possible.
LIST_PAGE_SIZE = MAX_LIST_PAGE_SIZE
#: Retrieve calls in flight at once per board: enough for hundreds of batches, gentle on the rate limit.
MAX_CONCURRENT_CALLS = 8

#: The boards, per event loop then per connection id. Weak on the loop, so a loop that ends without its
#: triggers leaving (a crashed test) does not keep its boards alive.
_boards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, PollBoard]] = (
    weakref.WeakKeyDictionary()
)
#: Closings under way: the event loop holds tasks only weakly, and a closing must finish even when the
#: trigger that started it is cancelled meanwhile.
_closing: set[asyncio.Task[None]] = set()


def join(conn_id: str, make_hook: Callable[[], Any]) -> PollBoard:
    """The board of the running event loop for ``conn_id``, created if there is none; counts the caller in.

    Every :func:`join` must be paired with one :meth:`PollBoard.leave`.

    :param conn_id: the Airflow connection whose batches are polled.
    :param make_hook: builds the board's hook when the board is created (an ``OpenAIBatchHook`` with the
        SDK's retries off: the triggers count every fault against their budgets). Called once per board.
    """
    loop = asyncio.get_running_loop()
    boards = _boards.setdefault(loop, {})
    board = boards.get(conn_id)
    if board is None:
        board = boards[conn_id] = PollBoard(conn_id, make_hook())
    board.refs += 1
    return board


def open_boards() -> list[PollBoard]:
    """Every board not closed yet, across event loops (for tests and diagnostics)."""
    return [board for boards in list(_boards.values()) for board in boards.values()]


class _Round:
    """The batch ids asked for within one coalescing window, and a future per asker to answer.

    A future per asker (not one shared): cancelling one asker cancels its future only, never the
    round the others wait on.
    """

    __slots__ = ("ids", "waiters")

    def __init__(self) -> None:
        self.ids: dict[str, None] = {}
        self.waiters: list[asyncio.Future[dict[str, Any]]] = []

    def answer(self, results: dict[str, Any] | BaseException | None) -> None:
        """Give every asker the results, or the exception, or (``None``) cancel them."""
        for waiter in self.waiters:
            if waiter.done():
                continue
            if results is None:
                waiter.cancel()
            elif isinstance(results, BaseException):
                waiter.set_exception(results)
            else:
                waiter.set_result(results)


class PollBoard:
    """Serves the batch-state requests of the triggers of one event loop for one connection.

    Use :func:`join` to get one, never the constructor.

    :param conn_id: the Airflow connection.
    :param hook: the board's own hook; its async client is shared by every trigger on the board.
    """

    def __init__(self, conn_id: str, hook: Any) -> None:
        self.conn_id = conn_id
        self.hook = hook
        #: Triggers on the board; the client is closed when this drops to 0.
        self.refs = 0
        self.closed = False
        #: The shared client once built (kept so a test can check it was closed).
        self.client: Any = None
        #: Counters, for the debug log and for tests.
        self.rounds = 0
        self.list_calls = 0
        self.retrieve_calls = 0
        self._open: _Round | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        #: What the board learnt about batches still wanted: when each was created (a walk can stop once
        #: its pages are older than every batch it still looks for) and the page a walk last found it on
        #: (to decide whether a walk is worth it). Forgotten once a batch is final or its trigger leaves.
        self._created_at: dict[str, int] = {}
        self._page_hint: dict[str, int] = {}
        #: Off after a non-transient list error: a server that refuses batches.list still serves retrieves.
        self._walks_enabled = True
        #: The last batch id of each page of the last walk, in order: the cursors of the next walk's pages.
        self._cursors: list[str] = []

    # -- triggers' side ------------------------------------------------------------------------

    async def ready(self) -> None:
        """Build the shared client now, so a bad connection fails the caller's wait at once."""
        self.client = await self.hook.aget_async_client()

    async def fetch(self, batch_ids: Sequence[str]) -> dict[str, Any]:
        """The current state of each batch: ``{batch_id: state or the exception its call raised}``, a state
        being the batch as the API answered it: a ``dict`` (parsed from a list page) or an openai
        ``Batch`` (from a retrieve); :func:`~airflow_openai_batch.core.progress.batch_summary` takes both.

        A ``batches.list`` failure is the answer for every batch the walk was still looking for; a
        retrieve failure only for its batch. Cancelling the caller does not cancel the round: other
        triggers may wait on it.
        """
        if self.closed:
            raise RuntimeError(f"the poll board of {self.conn_id!r} is closed")
        if not batch_ids:
            return {}
        current = self._open
        if current is None:
            current = self._open = _Round()
            task = asyncio.ensure_future(self._serve(current))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        current.ids.update(dict.fromkeys(batch_ids))
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        current.waiters.append(waiter)
        results = await waiter
        return {batch_id: results[batch_id] for batch_id in batch_ids}

    async def leave(self, batch_ids: Iterable[str] = ()) -> None:
        """Count a trigger out; the last one out ends any call still in flight, then closes the client.

        :param batch_ids: the leaving trigger's batches, whose remembered details are dropped.
        """
        for batch_id in batch_ids:
            self._forget(batch_id)
        self.refs -= 1
        if self.refs > 0 or self.closed:
            return
        self.closed = True
        # Out of the registry before any await, so a trigger joining meanwhile gets a fresh board.
        with contextlib.suppress(RuntimeError):
            boards = _boards.get(asyncio.get_running_loop(), {})
            if boards.get(self.conn_id) is self:
                del boards[self.conn_id]
        # Shielded: a leave() run while its trigger is being cancelled must still close the client.
        closing = asyncio.ensure_future(self._close())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)
        await asyncio.shield(closing)

    async def _close(self) -> None:
        self._open = None
        tasks = list(self._tasks)
        # Nobody is left to want these answers; end the calls before closing the client under them.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.hook.aclose()
        except Exception:
            # Closing a client must never turn a finished wait into a failure.
            log.debug("Closing the shared OpenAI client of %s failed", self.conn_id, exc_info=True)

    # -- serving a round -----------------------------------------------------------------------

    async def _serve(self, current: _Round) -> None:
        try:
            for _ in range(COALESCE_TURNS):
                await asyncio.sleep(0)
            # Open while requests keep coming: triggers started together (a triggerer restart, a burst of
            # deferrals) wake spread over the time it takes to start them all.
            waited, asked = 0.0, -1
            while COALESCE_SECONDS > 0 and len(current.ids) != asked and waited < MAX_COALESCE_SECONDS:
                asked = len(current.ids)
                await asyncio.sleep(COALESCE_SECONDS)
                waited += COALESCE_SECONDS
            if self._open is current:
                self._open = None
            results = await self._collect(list(current.ids))
        except asyncio.CancelledError:
            if self._open is current:
                self._open = None
            current.answer(None)
            raise
        except Exception as err:
            # A bug here must end the triggers' waits with an error, never leave them hanging.
            if self._open is current:
                self._open = None
            current.answer(err)
            return
        current.answer(results)

    async def _collect(self, ids: list[str]) -> dict[str, Any]:
        self.rounds += 1
        results: dict[str, Any] = {}
        rest = ids
        depth = self._plan_walk(ids)
        if depth:
            rest = await self._walk(ids, depth, results)
        if rest:
            answers = await asyncio.gather(*(self._retrieve(batch_id) for batch_id in rest))
            results.update(zip(rest, answers, strict=True))
        for batch_id, result in results.items():
            if isinstance(result, BaseException):
                continue
            if is_final(str(_field(result, "status"))):
                self._forget(batch_id)  # never asked for again
            else:
                self._created_at[batch_id] = int(_field(result, "created_at") or 0)
        log.debug(
            "Poll round for %d batch(es) of %s: walk planned %d page(s), %d retrieve(s); "
            "totals %d list call(s), %d retrieve(s) in %d round(s)",
            len(ids),
            self.conn_id,
            depth,
            len(rest),
            self.list_calls,
            self.retrieve_calls,
            self.rounds,
        )
        return results

    def _plan_walk(self, ids: Sequence[str]) -> int:
        """Pages a walk should plan to read for ``ids`` (0: retrieve each instead).

        The walk is worth it when its pages plus the retrieves of what it will not reach cost fewer calls
        than one retrieve per batch. A batch's page is the one a walk last found it on (batches are
        listed newest first, so it only moves later as new batches are created); a batch never walked
        for is assumed on the first page: if that is wrong, the walk stops after a page that did not pay.
        """
        count = len(ids)
        if not self._walks_enabled or count < LIST_MIN_IDS:
            return 0
        hints = sorted(self._page_hint.get(batch_id, 0) for batch_id in ids)
        best_depth, best_cost = 0, count
        for depth in sorted({hint + 1 for hint in hints}):
            if depth >= count:
                break
            cost = depth + count - bisect.bisect_left(hints, depth)
            if cost < best_cost:
                best_depth, best_cost = depth, cost
        return best_depth

    async def _walk(self, ids: list[str], depth: int, results: dict[str, Any]) -> list[str]:
        """Walk the list for ``ids``, filling ``results``; return the ids left for retrieves.

        The planned ``depth`` pages are read at once, from the cursors of the last walk. Then, while ids
        are unseen: what new batches pushed past the first page is read on from it; and past the planned
        pages the walk goes on one page at a time, stopping when every id is seen, when the pages get
        older than every id still unseen, at ``len(ids) - 1`` pages (never more calls than the retrieves
        it replaces), or as soon as it has spent as many pages as it found batches.
        """
        walk = _Walk(ids)
        cursors = self._cursors[: depth - 1]
        try:
            pages = await asyncio.gather(*(self._list_page(after) for after in [None, *cursors]))
            for index, page in enumerate(pages):
                self._read(walk, page, index)
            first = pages[0]
            if walk.unseen and cursors and first.data and first.data[-1]["id"] != cursors[0]:
                # New batches came in front: the ones they pushed past the first page sit between its
                # end and the second page's cursor.
                after: str | None = first.data[-1]["id"]
                while walk.unseen and after is not None and walk.pages < len(ids) - 1:
                    page = await self._list_page(after)
                    self._read(walk, page, 1)
                    reached = any(batch["id"] == cursors[0] for batch in page.data)
                    after = page.data[-1]["id"] if page.data and page.has_more and not reached else None
            chain = list(pages)
            while walk.unseen and chain[-1].has_more and chain[-1].data and walk.pages < len(ids) - 1:
                if walk.pages >= depth and walk.found <= walk.pages:
                    break
                horizon = self._horizon(walk.unseen)
                if horizon is not None and min(b["created_at"] for b in chain[-1].data) < horizon:
                    break
                page = await self._list_page(chain[-1].data[-1]["id"])
                self._read(walk, page, len(chain))
                chain.append(page)
        except Exception as err:
            results.update(walk.seen)
            if classify_api_error(err) == "fatal":
                # Not something waiting fixes (a compatible server without batches.list, say): retrieves
                # still work, so stop walking rather than fail every trigger.
                self._walks_enabled = False
                log.warning(
                    "batches.list failed on %s (%s); polling by retrieves only from now on",
                    self.conn_id,
                    describe_api_error(err),
                )
                return [batch_id for batch_id in ids if batch_id in walk.unseen]
            # Transient (429, 5xx, timeout, dropped connection): every trigger served by this walk counts
            # it as a fault and backs off (honouring Retry-After), as after a failed retrieve.
            for batch_id in walk.unseen:
                results[batch_id] = err
            return []
        self._cursors = [page.data[-1]["id"] for page in chain if page.data]
        results.update(walk.seen)
        for batch_id in walk.unseen:
            # Deeper than this walk went: guess twice as deep, so repeated misses stop planning walks soon.
            self._page_hint[batch_id] = max(self._page_hint.get(batch_id, 0), 2 * walk.pages)
        return [batch_id for batch_id in ids if batch_id in walk.unseen]

    async def _list_page(self, after: str | None) -> _Page:
        """One ``batches.list`` page after ``after`` (the first page for ``None``), parsed as plain JSON."""
        client = await self.hook.aget_async_client()
        self.list_calls += 1
        async with self._semaphore:
            raw = await client.batches.with_raw_response.list(
                limit=LIST_PAGE_SIZE, **({"after": after} if after is not None else {})
            )
        body = orjson.loads(raw.http_response.content)
        return _Page(body.get("data") or [], bool(body.get("has_more")))

    def _read(self, walk: _Walk, page: _Page, index: int) -> None:
        walk.pages += 1
        for batch in page.data:
            batch_id = batch["id"]
            if batch_id in walk.wanted or batch_id in self._page_hint:
                self._page_hint[batch_id] = index
            if batch_id in walk.unseen:
                walk.unseen.discard(batch_id)
                walk.seen[batch_id] = batch
                walk.found += 1

    def _horizon(self, unseen: set[str]) -> int | None:
        """The creation time of the oldest batch still unseen, if known for all of them."""
        times = [self._created_at.get(batch_id) for batch_id in unseen]
        if not times or any(t is None for t in times):
            return None
        return min(t for t in times if t is not None)

    async def _retrieve(self, batch_id: str) -> Any:
        async with self._semaphore:
            self.retrieve_calls += 1
            try:
                return await self.hook.aget_batch(batch_id)
            except Exception as err:
                return err

    def _forget(self, batch_id: str) -> None:
        self._created_at.pop(batch_id, None)
        self._page_hint.pop(batch_id, None)


class _Page:
    """One list page: its batches (plain dicts, newest first) and whether older ones follow."""

    __slots__ = ("data", "has_more")

    def __init__(self, data: list[dict[str, Any]], has_more: bool) -> None:
        self.data = data
        self.has_more = has_more


class _Walk:
    """What one walk is looking for and has found."""

    __slots__ = ("found", "pages", "seen", "unseen", "wanted")

    def __init__(self, ids: Sequence[str]) -> None:
        self.wanted = set(ids)
        self.unseen = set(ids)
        self.seen: dict[str, dict[str, Any]] = {}
        self.pages = 0
        self.found = 0


def _field(state: Any, name: str) -> Any:
    """A field of a batch state: a dict from a list page, or an openai ``Batch`` from a retrieve."""
    return state.get(name) if isinstance(state, dict) else getattr(state, name)

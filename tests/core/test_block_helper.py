"""BlockHelper and BlockPipeline: a second process for CPU-bound blocks, answers applied in order, the
caller doing the work itself whenever the helper cannot."""

from __future__ import annotations

import time

import pytest

from airflow_openai_batch.core.jsonl import HELPER_ENV, BlockHelper, BlockPipeline

HANDLERS = "tests.core.block_handlers"


def _start(factory: str, config: bytes = b"") -> BlockHelper:
    helper = BlockHelper.start(f"{HANDLERS}:{factory}", config)
    assert helper is not None
    return helper


def _run(helper: BlockHelper | None, blocks: list[bytes], local_cost: float = 0.0, **kwargs) -> tuple:
    applied: list[tuple[bytes, bytes]] = []
    done_here: list[bytes] = []

    def work(block: bytes) -> bytes:
        done_here.append(block)
        if local_cost:
            time.sleep(local_cost)  # stands for the CPU work of a real block
        return block.upper()

    pipeline = BlockPipeline(helper, work, bytes, lambda b, r: applied.append((b, r)), **kwargs)
    for block in blocks:
        pipeline.feed(block, block)
    pipeline.finish()
    return applied, done_here, pipeline


def test_blocks_are_applied_in_order_whoever_did_them() -> None:
    blocks = [b"block-%d" % i for i in range(60)]
    helper = _start("upper")
    try:
        applied, done_here, _ = _run(helper, blocks, inflight=2, max_pending=3)
    finally:
        helper.close()
    assert applied == [(b, b.upper()) for b in blocks]
    assert len(done_here) < len(blocks)  # the helper did part of it


def test_a_helper_that_dies_leaves_the_rest_to_the_caller() -> None:
    blocks = [b"block-%d" % i for i in range(30)]
    helper = _start("dies_at", b"block-10")
    try:
        applied, done_here, _ = _run(helper, blocks, inflight=3, max_pending=4)
    finally:
        helper.close()
    assert applied == [(b, b.upper()) for b in blocks]
    assert b"block-10" in done_here and not helper.alive


def test_the_split_adapts_to_which_side_is_slower() -> None:
    blocks = [b"block-%d" % i for i in range(40)]
    # A fast helper and slow work here: the helper is found idle, so it is given more.
    fast = _start("upper")
    try:
        _, done_fast, pipeline = _run(fast, blocks, local_cost=0.01, inflight=2, max_inflight=6)
    finally:
        fast.close()
    assert pipeline.inflight_limit == 6
    # A slow helper and instant work here: this process waits, so it keeps more blocks.
    slow = _start("upper", b"0.02")
    try:
        _, done_slow, pipeline = _run(slow, blocks, inflight=4, max_inflight=6, max_pending=7)
    finally:
        slow.close()
    assert pipeline.inflight_limit < 4
    assert len(done_slow) > len(done_fast)


def test_without_max_inflight_the_limit_stays_put() -> None:
    helper = _start("upper", b"0.01")
    try:
        _, _, pipeline = _run(helper, [b"x%d" % i for i in range(20)], inflight=3, max_pending=4)
    finally:
        helper.close()
    assert pipeline.inflight_limit == 3


def test_helpers_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HELPER_ENV, "0")
    assert BlockHelper.start(f"{HANDLERS}:upper", b"") is None
    applied, done_here, _ = _run(None, [b"a", b"b"])
    assert applied == [(b"a", b"A"), (b"b", b"B")] and done_here == [b"a", b"b"]


def test_the_helper_keeps_freed_memory_unless_the_user_said_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    helper = _start("environment")
    try:
        answers: list[bytes] = []
        pipeline = BlockPipeline(helper, lambda b: b"here", bytes, lambda b, r: answers.append(r))
        for name in (b"MALLOC_TRIM_THRESHOLD_", b"MALLOC_MMAP_THRESHOLD_"):
            pipeline.feed(name, name)
        pipeline.finish()
    finally:
        helper.close()
    assert answers == [str(256 << 20).encode(), b"65536"]


def test_blocks_sent_ahead_wait_for_release_then_come_first() -> None:
    applied: list[bytes] = []
    helper = _start("upper")
    try:
        pipeline = BlockPipeline(helper, bytes.upper, bytes, None, inflight=2, max_inflight=4)
        ahead = [b"a0", b"a1", b"a2"]
        assert all(pipeline.send_ahead(block, block, limit=3) for block in ahead)
        assert not pipeline.send_ahead(b"a3", b"a3", limit=3)  # the limit of blocks held
        assert applied == []
        pipeline.release(lambda block, result: applied.append(result))
        for block in (b"b0", b"b1"):
            pipeline.feed(block, block)
        pipeline.finish()
    finally:
        helper.close()
    assert applied == [b"A0", b"A1", b"A2", b"B0", b"B1"]


def test_nothing_is_sent_ahead_without_a_helper() -> None:
    pipeline = BlockPipeline(None, bytes.upper, bytes, None)
    assert not pipeline.send_ahead(b"x", b"x", limit=8)
    applied: list[bytes] = []
    pipeline.release(lambda block, result: applied.append(result))
    pipeline.feed(b"x", b"x")
    pipeline.finish()
    assert applied == [b"X"]


def test_answers_in_free_places_for_more_blocks_sent_ahead() -> None:
    """Blocks sent ahead are limited by the places at the helper, and an answer in frees one."""
    helper = _start("upper")
    try:
        pipeline = BlockPipeline(helper, bytes.upper, bytes, None, inflight=2)
        assert pipeline.send_ahead(b"a0", b"a0", limit=6)
        assert pipeline.send_ahead(b"a1", b"a1", limit=6)
        # Both places are taken until the answers are in: wait for both (taken and put back, in order).
        answers = [helper.answers.get(), helper.answers.get()]
        for answer in answers:
            helper.answers.put(answer)
        assert pipeline.send_ahead(b"a2", b"a2", limit=6)  # the answers in freed the places
        assert pipeline.send_ahead(b"a3", b"a3", limit=6)
        applied: list[bytes] = []
        pipeline.release(lambda block, result: applied.append(result))
        pipeline.finish()
    finally:
        helper.close()
    assert applied == [b"A0", b"A1", b"A2", b"A3"]


def test_a_helper_started_early_imports_ahead_and_waits_for_its_config() -> None:
    helper = BlockHelper.start(f"{HANDLERS}:imported", None, preload=["colorsys"])
    assert helper is not None
    try:
        assert not helper.configured
        with pytest.raises(RuntimeError, match="configure"):
            helper.send(b"colorsys", None)
        helper.configure(b"")
        with pytest.raises(RuntimeError, match="configured already"):
            helper.configure(b"")
        applied, done_here, _ = _run(helper, [b"colorsys", b"tests.core.block_handlers", b"wave"])
    finally:
        helper.close()
    assert done_here == []
    assert [answer for _, answer in applied] == [b"yes", b"yes", b"no"]

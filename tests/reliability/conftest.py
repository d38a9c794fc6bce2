"""Reliability suite: repeats every test's line of figures in the terminal summary of the run, and
hands the shared emulator back with its default knobs (these tests change them a lot)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.reliability.helpers import FIGURES


@pytest.fixture(autouse=True)
def _restore_the_shared_emulator(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator_server" in request.fixturenames:
        request.getfixturevalue("emulator_server").reset(restore_config=True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)

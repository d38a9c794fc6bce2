"""Deployment tests: their figures and screenshot paths, repeated in pytest's terminal summary."""

from __future__ import annotations

from typing import Any

#: Lines recorded by the deployment tests (timings, screenshot paths), shown at the end of the run.
RECORDED: list[str] = []


def record(line: str) -> None:
    print(f"[deployment] {line}", flush=True)
    RECORDED.append(line)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if RECORDED:
        terminalreporter.section("deployment")
        for line in RECORDED:
            terminalreporter.write_line(line)

"""Measurement inside a case's own process: wall time, CPU time and peak RSS of the work alone.

Each case runs in a fresh interpreter (see :mod:`bench.child`), so peak memory of one case never
contaminates another. Peak RSS is the process's high-water mark (``VmHWM``) plus the largest RSS of
any child process it waited for (``RUSAGE_CHILDREN``): an upper bound of what the case held at once.
CPU time is given whole and split into user and system time: on this kind of shared host the kernel's
share (page faults, page cache) swings from run to run far more than the user share does.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any


def _vm_hwm_kib() -> int:
    """Peak resident set size of this process in KiB (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _children_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process and the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def measure(work: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """Run ``work`` once and return its figures (plus whatever ``work`` returns).

    :return: ``{"seconds", "cpu_seconds", "user_seconds", "system_seconds", "peak_rss_mb", "own_rss_mb",
        "helper_rss_mb", ...}``.
    """
    user0, system0 = _cpu_seconds()
    t0 = time.perf_counter()
    extra = work() or {}
    seconds = time.perf_counter() - t0
    user1, system1 = _cpu_seconds()
    user, system = user1 - user0, system1 - system0
    own = _vm_hwm_kib() / 1024
    children = _children_kib() / 1024
    return {
        "seconds": seconds,
        "cpu_seconds": user + system,
        "user_seconds": user,
        "system_seconds": system,
        "peak_rss_mb": own + children,
        "own_rss_mb": own,
        "helper_rss_mb": children,
        **extra,
    }

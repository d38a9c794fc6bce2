"""A stand-in for a task context's ``outlet_events`` where a test does not look at the events."""

from __future__ import annotations

from typing import Any


class NoOutletEvents(dict):
    """``context["outlet_events"][alias].add(asset)`` accepted and dropped."""

    def __getitem__(self, alias: Any) -> Any:
        class _Accessor:
            def add(self, asset: Any, extra: Any = None) -> None:
                pass

        return _Accessor()

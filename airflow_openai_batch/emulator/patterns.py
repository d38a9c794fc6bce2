"""A string that matches a regular expression, chosen deterministically (for JSON Schema ``pattern``).

Strict mode lets a schema constrain strings with ``pattern``, so the emulator's structured answers must
match them. The regex is walked as parsed by the standard library's own regex parser; the result is
checked with :func:`re.search` and ``None`` is returned when a construct could not be honoured (a
lookaround, say).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

try:  # Python >= 3.11
    # The stdlib has no public regex syntax tree: its own parser (re's, the one re.compile uses) is the
    # only faithful reading of Python's regex dialect, which is what validators of ``pattern`` use too.
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

_DIGITS = "0123456789"
_WORD = "abcdefghijklmnopqrstuvwxyz" + _DIGITS + "_"
_SPACE = " "
# Characters tried for negated classes and ``.``, in order.
_FALLBACK = "ab0_ -.xZ"
_CATEGORY_CHARS: dict[Any, str] = {
    _c.CATEGORY_DIGIT: _DIGITS,
    _c.CATEGORY_WORD: _WORD,
    _c.CATEGORY_SPACE: _SPACE,
    _c.CATEGORY_NOT_DIGIT: "ab_",
    _c.CATEGORY_NOT_WORD: " -.",
    _c.CATEGORY_NOT_SPACE: "ab0",
}
# A repeat without an upper bound repeats at most this many extra times.
_EXTRA_REPEATS = 2


def sample_pattern(pattern: str, pick: Callable[[int], int]) -> str | None:
    """A string ``re.search(pattern, s)`` accepts, or ``None`` when none could be made.

    :param pattern: the regular expression.
    :param pick: ``pick(n)`` returns a deterministic choice in ``range(n)``.
    """
    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError):
        return None
    groups: dict[int, str] = {}
    try:
        text = _walk(list(parsed), pick, groups)
    except _CannotSample:
        return None
    return text if re.search(pattern, text) else None


class _CannotSample(Exception):
    pass


def _set_chars(items: list[tuple[Any, Any]]) -> str:
    """Characters a character class accepts (a few, in a stable order); "" for a negated class."""
    chars: list[str] = []
    for op, arg in items:
        if op is _c.LITERAL:
            chars.append(chr(arg))
        elif op is _c.RANGE:
            low, high = arg
            chars.extend(chr(c) for c in range(low, min(high, low + 25) + 1))
        elif op is _c.CATEGORY:
            chars.extend(_CATEGORY_CHARS.get(arg, ""))
    return "".join(chars)


def _char_in(items: list[tuple[Any, Any]], pick: Callable[[int], int]) -> str:
    if items and items[0][0] is _c.NEGATE:
        pattern = re.compile("[" + _negated_source(items[1:]) + "]")
        for ch in _FALLBACK + _WORD:
            if not pattern.match(ch):
                return ch
        raise _CannotSample
    chars = _set_chars(items)
    if not chars:
        raise _CannotSample
    return chars[pick(len(chars))]


def _negated_source(items: list[tuple[Any, Any]]) -> str:
    """The (positive) class source of a negated class's items, to test candidates against."""
    out = []
    for op, arg in items:
        if op is _c.LITERAL:
            out.append(re.escape(chr(arg)))
        elif op is _c.RANGE:
            out.append(f"{re.escape(chr(arg[0]))}-{re.escape(chr(arg[1]))}")
        elif op is _c.CATEGORY:
            out.append(
                {
                    _c.CATEGORY_DIGIT: r"\d",
                    _c.CATEGORY_WORD: r"\w",
                    _c.CATEGORY_SPACE: r"\s",
                    _c.CATEGORY_NOT_DIGIT: r"\D",
                    _c.CATEGORY_NOT_WORD: r"\W",
                    _c.CATEGORY_NOT_SPACE: r"\S",
                }.get(arg, "")
            )
    return "".join(out) or r"\x00"


def _walk(items: list[tuple[Any, Any]], pick: Callable[[int], int], groups: dict[int, str]) -> str:
    out: list[str] = []
    for op, arg in items:
        if op is _c.LITERAL:
            out.append(chr(arg))
        elif op is _c.NOT_LITERAL:
            out.append(next(ch for ch in _FALLBACK if ord(ch) != arg))
        elif op is _c.ANY:
            out.append(_FALLBACK[pick(2)])
        elif op is _c.IN:
            out.append(_char_in(list(arg), pick))
        elif op is _c.CATEGORY:
            chars = _CATEGORY_CHARS.get(arg)
            if not chars:
                raise _CannotSample
            out.append(chars[pick(len(chars))])
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            extra = 0 if high == low else min(pick(_EXTRA_REPEATS + 1), high - low)
            out.extend(_walk(list(sub), pick, groups) for _ in range(low + extra))
        elif op is _c.SUBPATTERN:
            group, _add, _del, sub = arg
            text = _walk(list(sub), pick, groups)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif op is getattr(_c, "ATOMIC_GROUP", None):
            out.append(_walk(list(arg), pick, groups))
        elif op is _c.BRANCH:
            _, alternatives = arg
            out.append(_walk(list(alternatives[pick(len(alternatives))]), pick, groups))
        elif op is _c.GROUPREF:
            out.append(groups.get(arg, ""))
        elif op is _c.AT:
            continue  # anchors match where the string starts and ends
        else:  # lookarounds, conditionals: the final re.search decides
            continue
    return "".join(out)

"""Which table format a file name says (no pyarrow needed: the submit operator asks before it knows
whether the ``parquet`` extra is used at all)."""

from __future__ import annotations

__all__ = ["TABLE_FORMATS", "TABLE_SUFFIXES", "table_format"]

#: Table formats a ``requests`` input may have.
TABLE_FORMATS: tuple[str, ...] = ("parquet", "csv")
#: The file name suffixes that say a table format (compared in lower case).
TABLE_SUFFIXES: dict[str, str] = {".parquet": "parquet", ".pq": "parquet", ".parq": "parquet", ".csv": "csv"}


def table_format(name: str) -> str | None:
    """The table format a file name says, or ``None`` (e.g. a JSONL file, or a folder).

    :param name: a path, URI or file name: ``tickets.parquet``, ``s3://bucket/drop.csv``...
    :return: ``"parquet"``, ``"csv"`` or ``None``.
    """
    base = str(name).rstrip("/").rsplit("/", 1)[-1].lower()
    dot = base.rfind(".")
    return TABLE_SUFFIXES.get(base[dot:]) if dot >= 0 else None

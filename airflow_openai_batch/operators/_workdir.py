"""Local scratch space for one task instance, reclaimed by the next try after a crash."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_openai_batch.compat import Context


@contextmanager
def task_work_dir(context: Context, purpose: str) -> Iterator[Path]:
    """A scratch folder named after the task instance, emptied on entry and removed on exit.

    A worker killed mid-task (SIGKILL, OOM) cannot clean up; because the folder's name is the same for
    every try of a task instance, the retry removes what the dead try left (chunk files of a 3 GB input,
    staged results) instead of leaking it.
    """
    ti = context["ti"]
    identity = "\x1f".join([ti.dag_id, ti.task_id, ti.run_id, str(getattr(ti, "map_index", -1))])
    name = f"{purpose}-{hashlib.sha256(identity.encode()).hexdigest()[:24]}"
    path = Path(tempfile.gettempdir()) / "airflow-openai-batch" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

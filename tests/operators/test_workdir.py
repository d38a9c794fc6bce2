"""The per-task scratch folder: a retry reclaims what a killed try left behind."""

from __future__ import annotations

from airflow_openai_batch.operators._workdir import task_work_dir


def test_a_retry_reclaims_the_scratch_of_a_killed_try(make_context) -> None:
    context = make_context(task_id="collect")
    with task_work_dir(context, "collect") as first:
        (first / "staged.parquet.partial").write_bytes(b"half")
        dead_try_path = first
    # A SIGKILL skips the clean-up: recreate the leftovers the way a killed try leaves them.
    dead_try_path.mkdir(parents=True)
    (dead_try_path / "staged.parquet.partial").write_bytes(b"half")

    with task_work_dir(make_context(task_id="collect"), "collect") as retry:
        assert retry == dead_try_path and list(retry.iterdir()) == []
        with task_work_dir(make_context(task_id="collect", run_id="other"), "collect") as other:
            assert other != retry  # another task instance never shares (or wipes) this folder
    assert not retry.exists()

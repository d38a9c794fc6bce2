"""The package registers as an Airflow provider, and Airflow's own CLI finds it."""

from __future__ import annotations

import os
import subprocess
import sys

import airflow_openai_batch
from airflow_openai_batch import get_provider_info


def _airflow_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
        check=True,
    )
    return result.stdout


def test_provider_info_names_every_class_and_the_connection_form() -> None:
    info = get_provider_info()
    assert info["package-name"] == "airflow-openai-batch"
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "openai_batch"
    assert conn_type["hook-class-name"] == "airflow_openai_batch.hooks.batch.OpenAIBatchHook"
    assert set(conn_type["conn-fields"]) >= {
        "organization",
        "project",
        "api_version",
        "timeout",
        "max_retries",
    }
    assert conn_type["ui-field-behaviour"]["relabeling"] == {"password": "API key", "host": "Base URL"}
    modules = [
        m
        for section in ("hooks", "operators", "sensors", "triggers")
        for e in info[section]
        for m in e["python-modules"]
    ]
    for module in modules:
        __import__(module)
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert getattr(__import__(module, fromlist=[name]), name)


def test_lazy_reexports_resolve_to_the_documented_classes() -> None:
    from airflow_openai_batch.hooks.batch import OpenAIBatchHook
    from airflow_openai_batch.operators.collect import OpenAIBatchCollectOperator
    from airflow_openai_batch.operators.submit import OpenAIBatchSubmitOperator
    from airflow_openai_batch.sensors.batch import OpenAIBatchSensor
    from airflow_openai_batch.triggers.batch import OpenAIBatchTrigger

    assert airflow_openai_batch.OpenAIBatchHook is OpenAIBatchHook
    assert airflow_openai_batch.OpenAIBatchSubmitOperator is OpenAIBatchSubmitOperator
    assert airflow_openai_batch.OpenAIBatchSensor is OpenAIBatchSensor
    assert airflow_openai_batch.OpenAIBatchTrigger is OpenAIBatchTrigger
    assert airflow_openai_batch.OpenAIBatchCollectOperator is OpenAIBatchCollectOperator


def test_airflow_cli_lists_the_provider_its_hook_and_trigger(airflow_db) -> None:
    assert "airflow-openai-batch" in _airflow_cli("providers", "list")
    hooks = _airflow_cli("providers", "hooks")
    assert "openai_batch" in hooks and "OpenAIBatchHook" in hooks
    assert "airflow_openai_batch.triggers.batch" in _airflow_cli("providers", "triggers")
    assert "OpenAIBatchLink" in _airflow_cli("providers", "links")

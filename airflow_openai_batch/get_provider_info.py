"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

_INTEGRATION = "OpenAI Batch"


def get_provider_info() -> dict[str, Any]:
    # Imported here: reading the version from the installed metadata takes tens of milliseconds, which
    # importing the package (or a helper process importing one core module) should not pay.
    from airflow_openai_batch.version import __version__

    return {
        "package-name": "airflow-openai-batch",
        "name": "OpenAI Batch",
        "description": "Submit, wait for and collect OpenAI Batch API jobs: streaming validation and "
        "splitting, retry-safe creation, a deferrable multi-batch sensor, and reconciled results.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://platform.openai.com/docs/guides/batch",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": _INTEGRATION, "python-modules": ["airflow_openai_batch.hooks.batch"]}],
        "operators": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "airflow_openai_batch.operators.submit",
                    "airflow_openai_batch.operators.collect",
                ],
            }
        ],
        "sensors": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_openai_batch.sensors.batch"]}
        ],
        "triggers": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_openai_batch.triggers.batch"]}
        ],
        "extra-links": [
            "airflow_openai_batch.links.OpenAIBatchLink",
            "airflow_openai_batch.links.OpenAIBatchesPageLink",
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_openai_batch.hooks.batch.OpenAIBatchHook",
                "hook-name": "OpenAI Batch",
                "connection-type": "openai_batch",
                "conn-fields": {
                    "organization": {"label": "Organization ID", "schema": {"type": ["string", "null"]}},
                    "project": {"label": "Project ID", "schema": {"type": ["string", "null"]}},
                    "api_version": {
                        "label": "Azure API version",
                        "schema": {"type": ["string", "null"]},
                        "description": "Only for Azure OpenAI (e.g. 2024-10-21): selects the Azure client.",
                    },
                    "azure_ad_token_provider": {
                        "label": "Azure: Entra ID login (no key)",
                        "schema": {"type": ["boolean", "null"]},
                        "description": "Log in to Azure OpenAI with azure-identity's DefaultAzureCredential "
                        "instead of a key (pip install 'airflow-openai-batch[azure]').",
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 600},
                    },
                    "max_retries": {
                        "label": "Max retries of idempotent calls",
                        "schema": {"type": ["integer", "null"], "default": 2},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API key", "host": "Base URL"},
                    "placeholders": {
                        "host": "empty for OpenAI; https://<resource>.openai.azure.com for Azure; "
                        "http://127.0.0.1:8000/v1 for the emulator",
                        "password": "sk-...",
                        "extra": '{"openai_client_kwargs": {}}',
                    },
                },
            }
        ],
    }

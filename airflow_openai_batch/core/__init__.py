"""Pure-Python building blocks (no Airflow import): JSONL streaming, validation and splitting, token
estimates, result reconciliation, pricing."""

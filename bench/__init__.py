"""Benchmarks of airflow-openai-batch against baselines measured in the same run: ``make bench``.

Sections: submit preparation (:mod:`bench.cases`), collect (:mod:`bench.cases`), polling cost
(:mod:`bench.polling`) and end to end (:mod:`bench.e2e`); :mod:`bench.__main__` runs them, each case in its
own interpreter (:mod:`bench.child`), and prints the table (:mod:`bench.report`).
"""

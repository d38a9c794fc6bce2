"""One measurement in a fresh interpreter: ``python -m bench.child '<spec JSON>'``.

The spec names the work (``{"kind": "case" | "tables" | "polling" | "e2e", ...}``) and a ``result_path`` where
the figures are written as JSON; the parent (:mod:`bench.__main__`) keeps this process's output in a
log file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    kind = spec["kind"]
    kwargs = spec.get("kwargs", {})
    if kind == "case":
        from bench.cases import CASES, preload
        from bench.measure import measure

        preload(spec["case"], kwargs)
        case = CASES[spec["case"]]
        result = measure(lambda: case(**kwargs))
    elif kind == "tables":
        from bench import tables
        from bench.measure import measure

        tables.preload(spec["case"])
        case = tables.CASES[spec["case"]]
        result = measure(lambda: case(**kwargs))
    elif kind == "polling":
        from bench import polling

        result = polling.run(**kwargs)
    elif kind == "trigger_cost":
        from bench import polling

        result = polling.trigger_cost(**kwargs)
    elif kind == "e2e":
        from bench import e2e

        result = e2e.run(**kwargs)
    elif kind == "cost":
        from bench import cost

        result = cost.run(**kwargs)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    Path(spec["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""What the package declares matches what it does: every import is a declared dependency, the console
script runs on a plain install, and the README states the operator's metadata budget as it is."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

import airflow_openai_batch
from airflow_openai_batch.operators.submit import OWN_METADATA_KEYS
from tests.support.imports import imports

PACKAGE = Path(airflow_openai_batch.__file__).parent
ROOT = PACKAGE.parent
DISTRIBUTION = "airflow-openai-batch"
#: Airflow is installed as several distributions; the one declared, apache-airflow, brings them all.
AIRFLOW_PARTS = {"apache-airflow-core", "apache-airflow-task-sdk"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*, extras: bool) -> set[str]:
    """The distributions the installed package requires: core ones, and with ``extras`` every extra's."""
    declared = set(AIRFLOW_PARTS)
    for text in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(text)
        in_extra = requirement.marker is not None and "extra" in str(requirement.marker)
        if _normalized(requirement.name) != DISTRIBUTION and (extras or not in_extra):
            declared.add(_normalized(requirement.name))
    return declared


def _undeclared(folder: Path, declared: set[str]) -> dict[str, set[str]]:
    """Modules imported (not optionally) by the files below ``folder`` that no declared distribution
    provides, with the distributions that do."""
    modules = {
        found.module.partition(".")[0]
        for path in folder.rglob("*.py")
        for found in imports(path.read_text(), str(path))
        if not found.optional
    }
    modules -= {*sys.stdlib_module_names, "airflow_openai_batch", "__future__"}
    providers = importlib.metadata.packages_distributions()
    provided = {module: {_normalized(d) for d in providers.get(module, [])} for module in modules}
    return {module: dists for module, dists in provided.items() if not dists & declared}


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    missing = _undeclared(PACKAGE, _declared(extras=True))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_emulator_script_needs_nothing_beyond_a_plain_install() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.dist and e.dist.name == DISTRIBUTION] == [
        "airflow_openai_batch.emulator.__main__:main"
    ]
    missing = _undeclared(PACKAGE / "emulator", _declared(extras=False))
    assert not missing, f"the emulator imports what only an extra installs: {missing}"


def test_the_readme_counts_the_metadata_keys_the_operator_adds() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"the operator adds (\d+) keys of its own", readme) == [str(len(OWN_METADATA_KEYS))]

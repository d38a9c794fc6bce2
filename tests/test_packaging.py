"""What the package declares matches what it does: every import is a declared dependency, the console
script runs on a plain install, and the README states the operator's metadata budget as it is."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

import airflow_openai_batch
from airflow_openai_batch.operators.submit import OWN_METADATA_KEYS

PACKAGE = Path(airflow_openai_batch.__file__).parent
ROOT = PACKAGE.parent
DISTRIBUTION = "airflow-openai-batch"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """The distributions the package requires: (core, core and every extra)."""
    core: set[str] = set()
    every: set[str] = set()
    for text in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(text)
        name = _normalized(requirement.name)
        if name == DISTRIBUTION:
            continue
        every.add(name)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            core.add(name)
    return core, every


def _third_party_imports(paths: list[Path]) -> set[str]:
    """Top-level modules imported by these files that are neither ours nor the standard library's.

    Imports inside ``try: ... except ImportError`` are optional by construction and left out.
    """
    found: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        optional = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(name.partition(".")[0] for name in names)
    return found - set(sys.stdlib_module_names) - {"airflow_openai_batch", "__future__"}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Each module's distributions (empty: no installed distribution provides it)."""
    providers = importlib.metadata.packages_distributions()
    return {module: {_normalized(d) for d in providers.get(module, [])} for module in modules}


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    _, declared = _declared()
    # Airflow itself is installed as several distributions (apache-airflow-core, -task-sdk...): the one
    # declared, apache-airflow, brings them all.
    declared |= {"apache-airflow-core", "apache-airflow-task-sdk"}
    undeclared = {
        module: dists
        for module, dists in _distributions(_third_party_imports(list(PACKAGE.rglob("*.py")))).items()
        if not dists & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_emulator_script_needs_nothing_beyond_a_plain_install() -> None:
    (script,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.dist.name == DISTRIBUTION
    ]
    assert script.name == "openai-batch-emulator"
    emulator = PACKAGE / "emulator"
    core, _ = _declared()
    core |= {"apache-airflow-core", "apache-airflow-task-sdk"}
    missing = {
        module: dists
        for module, dists in _distributions(_third_party_imports(list(emulator.rglob("*.py")))).items()
        if not dists & core
    }
    assert not missing, f"the emulator imports what only an extra installs: {missing}"


def test_the_readme_counts_the_metadata_keys_the_operator_adds() -> None:
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"the operator adds (\d+) keys of its own", readme)
    assert stated == [str(len(OWN_METADATA_KEYS))]

"""The package reaches Airflow only through ``airflow_openai_batch.compat``, so the supported-version
matrix (3.0 to the newest) is decided in one module; a direct import elsewhere would break 3.0 or 3.1."""

from __future__ import annotations

from pathlib import Path

import pytest

import airflow_openai_batch
from airflow_openai_batch import compat
from tests.support.imports import imports

PACKAGE = Path(airflow_openai_batch.__file__).parent


def airflow_imports(source: str, name: str) -> list[str]:
    """Every ``import airflow...`` / ``from airflow... import`` in a module's source, with its line."""
    found = sorted(imports(source, name), key=lambda found: (found.line, found.module))
    return [f"{name}:{i.line}: {i.module}" for i in found if i.module.split(".")[0] == "airflow"]


def test_only_compat_imports_airflow() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20, "the package was not found"
    outside = [
        hit
        for path in modules
        if path.name != "compat.py"
        for hit in airflow_imports(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert outside == [], "import these through airflow_openai_batch.compat:\n" + "\n".join(outside)
    assert airflow_imports((PACKAGE / "compat.py").read_text(), "compat.py"), "compat must import Airflow"


def test_the_checker_sees_every_kind_of_import() -> None:
    source = (
        "import airflow\nimport airflow.sdk as sdk\nfrom airflow.exceptions import TaskDeferred\n"
        "from airflow_openai_batch import compat\nimport airflowx\n"
        "if TYPE_CHECKING:\n    from airflow.models import TaskInstance\n"
        "def f():\n    from airflow.sdk import BaseHook\n"
    )
    hits = [hit.split(": ")[1] for hit in airflow_imports(source, "probe.py")]
    assert hits == ["airflow", "airflow.sdk", "airflow.exceptions", "airflow.models", "airflow.sdk"]


@pytest.mark.parametrize("name", compat.__all__)
def test_every_compat_name_resolves_on_this_airflow(name: str) -> None:
    assert getattr(compat, name) is not None


def test_task_state_store_is_none_without_one_and_the_store_with_one() -> None:
    class Store:
        def get(self, key, default=None):
            return default

        def set(self, key, value, *, retention=None):
            pass

    store = Store()
    assert compat.task_state_store({}) is None
    assert compat.task_state_store({"task_state_store": store}) is store


#: Airflow modules the newest release has and 3.0 lacks; tests take these names from compat,
#: ``airflow.providers.common.compat`` or ``tests/support/airflow_versions.py`` instead.
NOT_ON_THE_FLOOR = (
    "airflow.dag_processing.dagbag",
    "airflow.sdk.exceptions",
    "airflow.sdk.log",
    "airflow.sdk.module_loading",
)


def test_tests_import_no_module_the_floor_release_lacks() -> None:
    tests = Path(__file__).parent
    found = [
        hit
        for path in sorted(tests.rglob("*.py"))
        if path.name != "airflow_versions.py"
        for hit in airflow_imports(path.read_text(), str(path.relative_to(tests.parent)))
        if hit.split(": ")[1] in NOT_ON_THE_FLOOR
    ]
    assert found == [], "these break the fast suite on Airflow 3.0 (make test-floor):\n" + "\n".join(found)

"""The example nightly DAG on a real Airflow deployment, checked through the REST API and in a real browser.

Airflow's components run as separate processes on loopback (api-server, scheduler, dag-processor,
triggerer; LocalExecutor with two slots; ``tests/support/cluster.py``), the emulator runs in this
process. Everything is read the way a user reads it: the public REST API ``/api/v2`` with a JWT from the
simple auth manager's login, and the UI in headless Chromium (Debian's ``chromium``, driven by
Playwright). The emulator's ``rate`` knob holds the batches in progress until the sensor has been seen
deferred, then lets them finish: no sleeps, every wait is a bounded poll.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_openai_batch.get_provider_info import get_provider_info
from airflow_openai_batch.links import DASHBOARD_BATCHES_URL
from tests.conftest import REPO_ROOT, TEST_API_KEY
from tests.deployment.conftest import record
from tests.support.cluster import AirflowCluster
from tests.support.polling import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DAG_ID = "nightly_classification"
SAMPLE, PER_BATCH = 60, 20
BATCHES = SAMPLE // PER_BATCH
CHROMIUM = "/usr/bin/chromium"
#: Flags that let Debian's Chromium run headless as root in a container, with no calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


#: An element's background as sRGB [r, g, b]: the UI writes colours as oklch(), which a canvas converts.
RGB_OF_BACKGROUND = """e => {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 1;
    const context = canvas.getContext("2d");
    context.fillStyle = getComputedStyle(e).backgroundColor;
    context.fillRect(0, 0, 1, 1);
    return Array.from(context.getImageData(0, 0, 1, 1).data.slice(0, 3));
}"""


@pytest.fixture
def deployment(emulator, tmp_path_factory) -> Iterator[AirflowCluster]:
    home = tmp_path_factory.mktemp("airflow-deployment")
    extra = {"OPENAI_BATCH_OUTPUT_ROOT": str(home / "output"), "OPENAI_BATCH_POLL_INTERVAL": "1"}
    cluster = AirflowCluster(home, REPO_ROOT / "dags", extra, parallelism=2)
    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        record(f"deployment up in {time.monotonic() - started:.1f} s on port {cluster.port} (home {home})")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A page of headless Debian Chromium with a fresh profile (Playwright drives the system browser)."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(30_000)
        page = context.new_page()
        try:
            yield page
        finally:
            # What the browser showed last: the first thing to look at when a check above failed.
            last = tmp_path / "last-page.png"
            page.screenshot(path=last, full_page=True)
            record(f"screenshot: {last}")
            context.close()


def test_nightly_dag_runs_on_a_real_deployment_and_the_ui_shows_it(
    deployment: AirflowCluster, emulator, browser_page, tmp_path_factory
) -> None:
    cluster = deployment
    started = time.monotonic()
    # The connection a user would add in the UI, stored in the metadata DB (not an environment variable).
    cluster.create_connection(
        "openai_default",
        "openai_batch",
        host=emulator.base_url,
        password=TEST_API_KEY,
        extra={"max_retries": 3},
    )
    emulator.configure(rate=0.0)  # the batches stay in progress until the sensor is seen deferred
    # The first SAMPLE tickets of the example table, so the run makes BATCHES batches.
    tickets = cluster.home / "tickets.csv"
    with (REPO_ROOT / "dags" / "data" / "support_tickets.csv").open() as full:
        tickets.write_text("".join(line for _, line in zip(range(SAMPLE + 1), full, strict=False)))
    conf = {"tickets": str(tickets), "max_requests_per_batch": PER_BATCH}
    run_id = cluster.trigger(DAG_ID, conf)

    def deferred_and_polled() -> bool:
        states = cluster.ti_states(DAG_ID, run_id)
        failed = {task: state for task, state in states.items() if state in ("failed", "upstream_failed")}
        assert not failed, f"{states}\n{cluster.tail()}"
        # Beyond the sensor's own first look (one retrieve per batch): the triggerer is polling too.
        return states["wait"] == "deferred" and emulator.stats()["batches.retrieve"] >= 2 * BATCHES

    wait_until(
        deferred_and_polled, timeout=240, interval=0.5, what="the sensor to be deferred", details=cluster.tail
    )
    deferred_at = time.monotonic()
    assert cluster.ti_states(DAG_ID, run_id)["collect"] is None, "collect must wait for the sensor"
    emulator.configure(rate=1_000_000.0)

    def finished() -> str | None:
        state = cluster.run_state(DAG_ID, run_id)
        return state if state in ("success", "failed") else None

    final = wait_until(finished, timeout=240, interval=0.5, what="the DAG run to end", details=cluster.tail)
    states = cluster.ti_states(DAG_ID, run_id)
    assert final == "success", f"{states}\n{cluster.tail()}"
    assert set(states.values()) == {"success"}, states

    # -- REST API: the collect summary, the extra link, the asset event -------------------------------------
    batch_ids = cluster.xcom(DAG_ID, run_id, "submit")
    assert len(batch_ids) == BATCHES == emulator.stats()["batches"]
    summary = cluster.xcom(DAG_ID, run_id, "collect")
    assert summary["total"] == SAMPLE == summary["succeeded"] + summary["failed"]
    assert sorted(summary["batch_ids"]) == sorted(batch_ids)
    output_uri = summary["output_uri"].rstrip("/")
    assert output_uri.startswith("file://") and output_uri.endswith(f"/{run_id}/results")
    folder = Path(output_uri.removeprefix("file://"))
    assert {"successes.parquet", "manifest.json"} <= {p.name for p in folder.iterdir()}
    dashboard_url = f"{DASHBOARD_BATCHES_URL}/{batch_ids[0]}"
    links = cluster.extra_links(DAG_ID, run_id, "submit")
    assert links["OpenAI Batch"] == dashboard_url, links
    events = cluster.asset_events(source_dag_id=DAG_ID, source_run_id=run_id)
    assert [(e["uri"].rstrip("/"), e["source_task_id"]) for e in events] == [(output_uri, "collect")]
    api_done = time.monotonic()

    # -- The UI in a real browser ----------------------------------------------------------------------------
    shots = tmp_path_factory.mktemp("deployment-screenshots")
    page = browser_page
    page.goto(cluster.base + "/")
    page.locator("input[name=username]").fill(cluster.username)
    page.locator("input[name=password]").fill(cluster.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)

    # The run's grid: one green (success) cell per task, and the run's own badge says Success.
    page.goto(f"{cluster.base}/dags/{DAG_ID}/runs/{run_id}")
    colors = {
        task: page.get_by_test_id(f"grid-{run_id}-{task}")
        .get_by_test_id("task-state-badge")
        .evaluate(RGB_OF_BACKGROUND)
        for task in states
    }
    not_green = {task: color for task, color in colors.items() if not is_green(color)}
    assert not not_green, f"grid cells that are not green: {not_green}"
    assert page.get_by_test_id("header-card").get_by_test_id("state-badge").inner_text().strip() == "Success"
    page.screenshot(path=shots / "1-run-grid.png", full_page=True)

    # The submit task's Details tab: the "OpenAI Batch" extra link points at the batch's dashboard page.
    page.goto(f"{cluster.base}/dags/{DAG_ID}/runs/{run_id}/tasks/submit/details")
    link = page.get_by_role("link", name="OpenAI Batch", exact=True)
    assert link.get_attribute("href") == dashboard_url
    page.get_by_text("Extra Links").wait_for()
    page.screenshot(path=shots / "2-submit-details-extra-links.png", full_page=True)

    # A new openai_batch connection: Base URL, the API key masked, and every extra field of the provider.
    (conn_type,) = get_provider_info()["connection-types"]
    page.goto(f"{cluster.base}/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("combobox").fill("OpenAI Batch")
    page.get_by_role("option", name="OpenAI Batch", exact=True).click()
    # One section of the form is open at a time: the standard fields first, then the extra fields.
    open_section(dialog, "Standard Fields", dialog.locator("input[name=host]"))
    page.screenshot(path=shots / "3-new-connection-standard-fields.png")
    assert dialog.get_by_text("Base URL", exact=True).is_visible()
    assert "for the emulator" in (dialog.locator("input[name=host]").get_attribute("placeholder") or "")
    assert dialog.get_by_text("API key", exact=True).is_visible()
    assert dialog.locator("input[name=password]").get_attribute("type") == "password"
    for hidden in ("login", "schema", "port"):
        assert dialog.locator(f"input[name={hidden}]").count() == 0, f"{hidden} should be hidden"
    first_extra = next(iter(conn_type["conn-fields"]))
    open_section(dialog, "Extra Fields", dialog.locator(f"[name=element_{first_extra}]"))
    page.screenshot(path=shots / "4-new-connection-extra-fields.png")
    for name, field in conn_type["conn-fields"].items():
        assert dialog.locator(f"[name=element_{name}]").count() == 1, name
        label = dialog.get_by_text(re.compile(rf"^{re.escape(field['label'])}\s*$"))
        assert label.first.is_visible(), f"no visible label {field['label']!r} for {name}"

    # The stored connection: its Base URL shown, its API key masked and absent from the page.
    page.goto(f"{cluster.base}/connections")
    page.get_by_role("button", name="Edit Connection").click()
    dialog = page.get_by_role("dialog")
    open_section(dialog, "Standard Fields", dialog.locator("input[name=host]"))
    page.screenshot(path=shots / "5-stored-connection.png")
    assert dialog.locator("input[name=host]").input_value() == emulator.base_url
    assert dialog.locator("input[name=password]").get_attribute("type") == "password"
    assert TEST_API_KEY not in page.content(), "the API key reached the page"

    for path in sorted(shots.iterdir()):
        record(f"screenshot: {path}")
    record(
        f"nightly DAG on a real deployment: deferred after {deferred_at - started:.1f} s, run + API checks "
        f"{api_done - started:.1f} s, browser checks {time.monotonic() - api_done:.1f} s, "
        f"{summary['total']} requests in {BATCHES} batches ({summary['failed']} failed by the emulator)"
    )


def open_section(dialog: Any, title: str, content: Any) -> None:
    """Open a section of the connection form unless the UI already shows it open."""
    dialog.get_by_text(title, exact=True).wait_for()
    if not content.is_visible():
        dialog.get_by_text(title, exact=True).click()
    content.wait_for(state="visible")


def is_green(rgb: list[int]) -> bool:
    """Whether an sRGB colour is a clear green (the grid's success colour)."""
    red, green, blue = rgb
    return green > 80 and green > red + 40 and green > blue + 40

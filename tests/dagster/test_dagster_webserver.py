"""The real webserver: `dagster dev` in its own process group, a backfill over two nights (each split into
two adapter shards, each shard a step in its own process) through GraphQL, the results read back with
Polars and DuckDB SQL, and the UI in headless Chromium; and the UI `make ui` opens after `make demo`."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl
import pytest

from fleet_tables import ADAPTER_IDS, DATES

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
ASSETS = ["requests", "inference_plan", "generations", "adapter_metrics"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      runs(limit: 10) { status tags { key value } stepStats { stepKey status startTime endTime } }
    }
    ... on Error { message }
  }
}"""
ASSET_NODES = "{ assetNodes { assetKey { path } } }"
NIGHTS = """
{
  assetNodeOrError(assetKey: {path: ["adapter_metrics"]}) {
    ... on AssetNode { partitionKeys partitionStats { numMaterialized numPartitions numFailed } }
  }
  assetCheckExecutions(assetKey: {path: ["adapter_metrics"]}, checkName: "no_regressions", limit: 10) {
    status partition
  }
}"""
FINISHED = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, **variables) -> dict:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.load(response)
    assert "errors" not in reply, reply["errors"]
    return reply["data"]


def wait_for(what: str, condition, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except OSError:   # not listening yet
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not within {timeout_s}s; dagster dev said:\n{log.read_text()[-5000:]}")


@contextmanager
def dagster_dev(env: dict, log: Path):
    """`make ui`'s command on a free port; yields the UI's URL. The whole process group is killed at the
    end: dagster dev's webserver, daemon and code servers survive a SIGTERM to the parent alone."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "dagster_project.ui", "-p", str(port)], cwd=REPO,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the code location", lambda: process.poll() is None and
                 len(graphql(url, ASSET_NODES)["assetNodes"]) == len(ASSETS), 180, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def skip_without_chromium() -> None:
    """`make test` installs Chromium with apt-get, which needs root or sudo. Without it a test runs all but its
    browser part, then says it skipped that."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser part: no Chromium at {CHROMIUM} (`make browser` installs Debian's, as root)")


def step_times(run: dict, step: str) -> tuple[float, float]:
    [stats] = [s for s in run["stepStats"] if s["stepKey"] == step]
    assert stats["status"] == "SUCCESS"
    return stats["startTime"], stats["endTime"]


@pytest.mark.e2e
def test_backfill_of_two_nights_from_the_webserver(lorafleet, tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LORAFLEET_ROOT": lorafleet.root,
           "LORAFLEET_MODEL": lorafleet.model, "LORAFLEET_ADAPTERS": lorafleet.adapters,
           "LORAFLEET_MAX_ERROR_RATE": str(lorafleet.max_error_rate), "LORAFLEET_ADAPTER_SHARDS": "2"}
    log = tmp_path / "dagster_dev.log"
    with dagster_dev(env, log) as url:
        params = {"assetSelection": [{"path": [a]} for a in ASSETS], "partitionNames": DATES,
                  "title": "two nights"}
        launched = graphql(url, LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        backfill = wait_for("the backfill", lambda: (b := graphql(url, BACKFILL, id=backfill_id)
                                                     ["partitionBackfillOrError"])["status"] in FINISHED and b,
                            480, log)
        assert backfill["status"] == "COMPLETED_SUCCESS", (backfill, log.read_text()[-5000:])
        runs = backfill["runs"]
        assert sorted(t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition") == DATES
        # pool gpu-<i> (limit 1) runs one engine at a time on GPU i: the nights' shard-i steps never overlap
        for shard in range(2):
            first, second = sorted(step_times(r, f"generations.generate_shard_{shard}") for r in runs)
            assert first[1] <= second[0]

        if os.path.exists(CHROMIUM):
            show_in_chromium(url, backfill_id)

    for date in DATES:   # each night's rows came from both shards, into one folder
        names = {p.name.split("-")[1] for p in Path(lorafleet.root, "results", f"date={date}").glob("part-*")}
        assert names == {"s0of2", "s1of2"}, names
    results = pl.read_parquet(f"{lorafleet.root}/results/**/*.parquet", hive_partitioning=True)
    assert results.group_by(pl.col("date").cast(pl.String)).len().sort("date").rows() == [(d, 8) for d in DATES]
    assert results.filter(pl.col("finish_reason") == "error")["request_id"].sort().to_list() == \
        ["bad", "bad", "ghost", "ghost"]
    per_adapter = duckdb.sql(f"""
        SELECT CAST(date AS VARCHAR) AS date, coalesce(adapter_id, 'base') AS adapter, count(*) AS rows,
               sum(output_tokens) AS output_tokens
        FROM read_parquet('{lorafleet.root}/results/**/*.parquet', hive_partitioning = true)
        WHERE finish_reason <> 'error'
        GROUP BY ALL ORDER BY ALL""").fetchall()
    adapters = sorted([*ADAPTER_IDS, "base"])
    assert [(d, a, n) for d, a, n, _ in per_adapter] == [(d, a, 2) for d in DATES for a in adapters]
    assert all(tokens > 0 for *_, tokens in per_adapter)
    skip_without_chromium()


@contextmanager
def chromium_page():
    """A page of headless Chromium (the one `make browser` installs); screenshots go to test-artifacts/."""
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def show_in_chromium(url: str, backfill_id: str) -> None:
    """The asset graph shows the four assets with their passed checks; the backfill page shows every asset
    100% completed over the two nights. Both screenshots go to test-artifacts/."""
    from playwright.sync_api import expect
    with chromium_page() as page:
        page.goto(f"{url}/asset-groups")
        for name in ASSETS:
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("2 / 2 Passed")).to_be_visible(timeout=60_000)    # generations' checks
        expect(page.get_by_text("1 / 1 Passed")).to_be_visible()                   # adapter_metrics'
        page.screenshot(path=ARTIFACTS / "dagster-asset-graph.png")

        page.goto(f"{url}/runs/b/{backfill_id}")
        expect(page.locator('span[data-tooltip="Succeeded"]')).to_be_visible(timeout=60_000)  # the status tag
        expect(page.get_by_text(f"{DATES[0]}...{DATES[1]}")).to_be_visible()
        expect(page.get_by_text("100% completed")).to_have_count(len(ASSETS), timeout=60_000)
        for name in ASSETS:
            expect(page.locator(f'a[href="/assets/{name}"]')).to_be_visible()
        page.screenshot(path=ARTIFACTS / "dagster-backfill.png")


@pytest.mark.e2e
def test_the_demo_opens_on_its_three_nights_and_the_failed_check(demo_nights, tmp_path):
    """`make demo` materializes its nights into the instance `make ui` opens: the partition set starts at its
    first night, all three are materialized, and no_regressions failed on the last one only."""
    env = {name: value for name, value in os.environ.items() if name != "LORAFLEET_START_DATE"}  # from the data
    env.update(DAGSTER_HOME=str(demo_nights.dagster_home), LORAFLEET_ROOT=demo_nights.result.root)
    dates = demo_nights.result.dates
    with dagster_dev(env, tmp_path / "dagster_dev.log") as url:
        nights = graphql(url, NIGHTS)
        assert nights["assetNodeOrError"]["partitionKeys"] == dates
        assert nights["assetNodeOrError"]["partitionStats"] == {"numMaterialized": 3, "numPartitions": 3,
                                                                 "numFailed": 0}
        assert sorted((e["partition"], e["status"]) for e in nights["assetCheckExecutions"]) == \
            [(dates[0], "SUCCEEDED"), (dates[1], "SUCCEEDED"), (dates[2], "FAILED")]
        if os.path.exists(CHROMIUM):
            show_demo_in_chromium(url)
    skip_without_chromium()


def show_demo_in_chromium(url: str) -> None:
    """The asset graph: three partitions of each asset, generations' checks passed, no_regressions failed;
    adapter_metrics: the worst adapters as a table whose base row is named `<base>`, and the chart."""
    from playwright.sync_api import expect
    with chromium_page() as page:
        page.goto(f"{url}/asset-groups")
        expect(page.get_by_text("0 / 1 Passed")).to_be_visible(timeout=60_000)    # adapter_metrics' check
        expect(page.get_by_text("2 / 2 Passed")).to_be_visible()                   # generations'
        expect(page.get_by_text("3 partitions", exact=True)).to_have_count(len(ASSETS))
        page.screenshot(path=ARTIFACTS / "dagster-demo-asset-graph.png")

        page.goto(f"{url}/assets/adapter_metrics")
        expect(page.get_by_role("cell", name="<base>", exact=True)).to_be_visible(timeout=60_000)
        page.get_by_text("[Show Markdown]").click()
        expect(page.locator("img[src^='data:image/png']")).to_be_visible()
        page.wait_for_timeout(1000)   # the dialog fades in
        page.screenshot(path=ARTIFACTS / "dagster-demo-chart.png")


"""The Prefect UI served by `serve_main`, in a real browser: Debian's chromium, headless, driven by Playwright.

CI installs the browser with `apt-get install -y chromium`; Playwright's own browser download
is not used. The screenshots go to the test's tmp folder, or to $TINYLLAMA_SCREENSHOTS when set.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from flows.pretrain import manifest_uri
from tasks.reporting import artifact_key, build_artifact_key

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000
BUILD_STEPS = ("plan", "ingest", "exact-dedup", "tokenizer", "tokenize", "manifest")  # near dedup is off here


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TINYLLAMA_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def browser_page() -> Iterator[Page]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def test_the_ui_shows_the_finished_build_its_progress_bars_and_its_summary(served, finished_build, tmp_path):
    config, run = finished_build
    ui = served.api_url.removesuffix("/api")
    shots = screenshots(tmp_path)
    with browser_page() as page:
        page.goto(f"{ui}/runs")  # the list of flow runs
        page.get_by_role("link", name=run.name, exact=True).click()
        expect(page).to_have_url(re.compile(f"/runs/flow-run/{run.id}"))
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.screenshot(path=shots / "build-run.png")

        # A progress bar per step that runs stages, and the summary (every card names its artifact).
        page.get_by_text("Artifacts", exact=True).click()
        for step in BUILD_STEPS[1:-1]:  # plan and manifest run no stage
            expect(page.get_by_text(build_artifact_key(config, step, "progress"), exact=True)).to_be_visible()
        expect(page.get_by_text("None", exact=True)).to_have_count(0)  # the Flow run group holds the summary
        page.screenshot(path=shots / "build-artifacts.png", full_page=True)
        page.get_by_text(build_artifact_key(config, "summary"), exact=True).click()
        expect(page.get_by_text(manifest_uri(config))).to_be_visible()
        steps = page.get_by_role("table").first  # the steps, in pipeline order
        expect(steps.get_by_role("row")).to_have_count(1 + len(BUILD_STEPS))
        for i, step in enumerate(BUILD_STEPS, start=1):
            expect(steps.get_by_role("row").nth(i).get_by_role("cell").first).to_have_text(step)
        expect(page.get_by_role("cell", name="slimpajama")).to_be_visible()
        expect(page.get_by_role("link", name="this build run")).to_have_attribute("href", re.compile(str(run.id)))
        page.screenshot(path=shots / "build-summary.png", full_page=True)


async def _artifacts(client, keys):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))


def test_a_training_run_shows_its_loss_curve_and_live_status(served, finished_build, tmp_path):
    from tests.deployments.conftest import RUN, RUN_TIMEOUT_S

    keys = [artifact_key(RUN, "loss-curve"), artifact_key(RUN, "train-progress")]
    # The build's automation trains RUN's first segment (the deployment tests may have trained more).

    def both() -> dict | None:
        newest = {a.key: a for a in sorted(served.call(_artifacts, keys), key=lambda a: a.created)}
        return newest if len(newest) == 2 else None

    by_key = served.wait_for(both, RUN_TIMEOUT_S, "the training run's artifacts")
    progress = by_key[artifact_key(RUN, "train-progress")]
    assert progress.data == 100.0 and progress.description.endswith("segment done")  # of this segment's steps
    ui = served.api_url.removesuffix("/api")
    shots = screenshots(tmp_path)
    with browser_page() as page:
        page.goto(f"{ui}/artifacts/artifact/{by_key[artifact_key(RUN, 'loss-curve')].id}")
        image = page.get_by_role("img", name="loss curve")
        expect(image).to_be_visible()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 0  # decoded, not a broken link
        page.screenshot(path=shots / "loss-curve.png", full_page=True)

        page.goto(f"{ui}/artifacts/artifact/{progress.id}")
        expect(page.get_by_text(re.compile(r"step \d+ of 100000 \(this segment: (\d+)/\1\) · loss \d"))).to_be_visible()
        page.screenshot(path=shots / "train-progress.png")

        page.goto(f"{ui}/runs/flow-run/{progress.flow_run_id}")  # the training run: both cards, with the metrics
        page.get_by_text("Artifacts", exact=True).click()
        expect(page.get_by_text(artifact_key(RUN, "loss-curve"), exact=True)).to_be_visible()
        expect(page.get_by_text("None", exact=True)).to_have_count(0)  # the Flow run group holds the curve
        page.screenshot(path=shots / "train-run-artifacts.png", full_page=True)

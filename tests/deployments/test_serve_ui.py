"""The Prefect UI served by `serve_main`, in a real browser: Debian's chromium, headless, driven by Playwright.

CI installs the browser with `apt-get install -y chromium`; Playwright's own browser download
is not used.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from flows.pretrain import manifest_uri
from tasks.reporting import artifact_key

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000


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


def test_the_ui_shows_the_finished_build_its_stages_and_its_summary_artifact(served, finished_build, tmp_path):
    config, run = finished_build
    ui = served.api_url.removesuffix("/api")
    with browser_page() as page:
        page.goto(f"{ui}/runs")  # the list of flow runs
        page.get_by_role("link", name=run.name, exact=True).click()
        expect(page).to_have_url(re.compile(f"/runs/flow-run/{run.id}"))
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.screenshot(path=tmp_path / "flow-run.png")

        # Every stage left a table artifact; the manifest stage a markdown summary.
        page.get_by_text("Artifacts", exact=True).click()
        for stage in ("plan", "ingest", "exact-dedup", "tokenize"):
            expect(page.get_by_text(artifact_key(config.name, stage), exact=True)).to_be_visible()
        page.get_by_text(artifact_key(config.name, "summary"), exact=True).click()
        expect(page.get_by_text(manifest_uri(config))).to_be_visible()
        expect(page.get_by_role("cell", name="slimpajama")).to_be_visible()
        page.screenshot(path=tmp_path / "summary-artifact.png")


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
    with browser_page() as page:
        page.goto(f"{ui}/artifacts/artifact/{by_key[artifact_key(RUN, 'loss-curve')].id}")
        image = page.get_by_role("img", name="loss curve")
        expect(image).to_be_visible()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 0  # decoded, not a broken link
        page.screenshot(path=tmp_path / "loss-curve.png")

        page.goto(f"{ui}/artifacts/artifact/{progress.id}")
        expect(page.get_by_text(re.compile(r"step \d+/100000 · segment \d+→\d+ · loss \d"))).to_be_visible()
        page.screenshot(path=tmp_path / "train-progress.png")

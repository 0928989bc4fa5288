"""Make the Prefect UI screenshots of docs/training.md: a run while it trains (its live card, the
loss curve drawn as it goes), then the same run cancelled from the UI.

    .venv/bin/python docs/images/make_screenshots.py            # 5-10 minutes; rewrites docs/images/training-*.png
    .venv/bin/python docs/images/make_screenshots.py --keep /tmp/shots   # keep the data, Prefect home and logs

It lives beside the images it makes (it is how they are made, not a test or a benchmark), and it
runs what a user runs: `tinyllama make-corpus`, `tinyllama serve` on a free port with a Prefect
home of its own, `tinyllama submit-build --wait`, then a run of the train-on-build deployment
(parent flow run train-on-build, child flow run train) of a two-layer model on 2 gloo processes,
seen in Debian's chromium driven by Playwright. Its pictures are taken at fixed points (the live
card once it holds LIVE_ROWS logged steps; the runs, their cards and the end of their logs once
both ended Cancelled after a press of the parent's Cancel button), in a fixed viewport, so a rerun gives the same pictures up to the
measured numbers (loss values, tokens/s, times).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

IMAGES = Path(__file__).resolve().parent
TINYLLAMA = [sys.executable, "-m", "deployments.cli"]
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 1000}
RUN = "sample-tiny"
LIVE_ROWS = 12  # logged steps on the live card when it is pictured
TIMEOUT_S = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=IMAGES, help="Where the PNGs go")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="tinyllama-screenshots-"))
    root.mkdir(parents=True, exist_ok=True)
    from deployments.serve import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # a server of its own
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_RUNNER_POLL_FREQUENCY="1")
    os.environ.clear()
    os.environ.update(env, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")  # this process's client, before prefect loads
    data = root / "data"
    build_yaml, train_yaml = configs(root, data, env)
    serve_log = open(root / "serve.log", "wb")
    serve = subprocess.Popen(
        [*TINYLLAMA, "--data", str(data), "serve", "--port", str(port), "--build-config", str(build_yaml),
         "--train-config", str(train_yaml), "--no-train-after-build"],
        env=env, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    done = False
    try:
        wait_for(lambda: deployment_registered("train-on-build/triggered"), "the served deployments", serve)
        say(f"serving on port {port}; building the sample corpus")
        tinyllama("--data", str(data), "submit-build", str(build_yaml), "--wait", "--api-url", os.environ["PREFECT_API_URL"],
                  env=env)
        from flows.pretrain import manifest_uri
        from tasks.config import BuildConfig

        build = yaml.safe_load(build_yaml.read_text())
        train = yaml.safe_load(train_yaml.read_text())
        manifest = manifest_uri(BuildConfig.model_validate(build))
        train["val"] = {"manifest": manifest, "every": 10, "batches": 2}  # a picture, not a measurement
        parent = submit_training(build, train)
        pictures(f"http://127.0.0.1:{port}", parent, args.out, serve)
        done = True
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C of `tinyllama serve` sends
            try:
                serve.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        if done and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not done:
            say(f"the data, Prefect home and serve.log are kept in {root}")


def configs(root: Path, data: Path, env: dict) -> tuple[Path, Path]:
    """The sample corpus's build config (a small corpus, exact dedup only) and a run config whose
    steps take a fraction of a second on 2 CPU processes, logged every 2 steps."""
    tinyllama("make-corpus", str(root / "raw"), "--target-bytes", str(96 << 10), "--seed", "5", env=env)
    build = yaml.safe_load((root / "raw" / "sample.yaml").read_text())
    build.update(output=str(data), tokenizer={"train": {"vocab_size": 512}}, dedup={"exact": True, "near": False})
    train = {
        "name": RUN, "output": str(data), "model": "tiny",
        "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 128, "max_seq_len": 64},
        "seq_len": 64, "global_batch_tokens": 512, "micro_batch": 4,
        "lr": {"max": 3e-3, "min": 3e-4, "warmup_steps": 5},
        "max_steps": 2000, "checkpoint_every": 20, "log_every": 2, "work_dir": str(root / "work"),
        "launcher": {"kind": "torchrun", "nproc": 2},
    }
    build_yaml, train_yaml = root / "build.yaml", root / "train.yaml"
    build_yaml.write_text(yaml.safe_dump(build))
    train_yaml.write_text(yaml.safe_dump(train))
    return build_yaml, train_yaml


def tinyllama(*args: str, env: dict) -> None:
    done = subprocess.run([*TINYLLAMA, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: tinyllama {args[0]} ... exited {done.returncode}:\n{done.stdout}{done.stderr}")


def submit_training(build: dict, train: dict):
    """A run of the train-on-build deployment (what the automation starts after a build)."""
    from deployments.deploy import TRAIN_ON_BUILD, submit

    return submit(TRAIN_ON_BUILD, {"build": build, "train": train, "train_run": RUN})


def pictures(ui: str, parent, out: Path, serve: subprocess.Popen) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tasks.reporting import artifact_key

    live_key, progress_key = artifact_key(RUN, "train-live"), artifact_key(RUN, "train-progress")

    def live_card():
        [card] = artifacts(live_key) or [None]
        return card if card and card.data.count("\n| ") >= LIVE_ROWS + 1 and " · validation loss " in card.data else None

    card = wait_for(live_card, f"{LIVE_ROWS} logged steps on the live card", serve)
    child = card.flow_run_id
    say(f"live card of flow run {child}: taking pictures")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        page.goto(f"{ui}/artifacts/artifact/{card.id}")  # the card, as it is now
        chart = page.get_by_role("img", name="loss curve")
        expect(chart).to_be_visible()
        assert chart.evaluate("img => img.complete && img.naturalWidth") > 0  # decoded, not a broken image
        page.screenshot(path=out / "training-live-card.png", full_page=True)

        page.goto(f"{ui}/runs/flow-run/{child}")  # the child run, its Artifacts tab: the cards of the run
        expect(page.get_by_text("Running").first).to_be_visible()
        page.get_by_text("Artifacts", exact=True).click()
        expect(page.get_by_text(progress_key, exact=True)).to_be_visible()
        page.screenshot(path=out / "training-live-run.png", full_page=True)

        say("cancelling the parent run from its page")
        page.goto(f"{ui}/runs/flow-run/{parent.id}")
        page.get_by_role("button", name="Cancel", exact=True).click()
        page.get_by_role("button", name="Confirm", exact=True).click()  # the modal "Cancel Flow Run"
        wait_for(lambda: all(run_state(run) == "CANCELLED" for run in (parent.id, child)), "both runs Cancelled", serve)
        progress = artifacts(progress_key)[0]
        assert progress.description and "cancelled at step" in progress.description, progress.description

        page.goto(f"{ui}/runs/flow-run/{child}")
        expect(page.get_by_text("Cancelled").first).to_be_visible()
        page.get_by_text("Artifacts", exact=True).click()
        expect(page.get_by_text(re.compile("cancelled at step \\d+; checkpoint step \\d+ kept"))).to_be_visible()
        page.screenshot(path=out / "training-cancelled-run.png", full_page=True)

        for run, name in ((child, "training-cancelled-logs"), (parent.id, "training-cancelled-parent-logs")):
            page.goto(f"{ui}/runs/flow-run/{run}")
            page.get_by_text("Logs", exact=True).click()
            expect(page.get_by_text(re.compile(r"Beginning (sub)?flow run"))).to_be_visible()
            finished = page.get_by_text(re.compile(r"Finished in state Cancelled\("))
            page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 100)
            for _ in range(200):  # down to the end of the log (the UI loads it a page at a time)
                if finished.count():
                    break
                page.mouse.wheel(0, 2000)
                page.wait_for_timeout(250)
            finished.last.scroll_into_view_if_needed()
            expect(finished.last).to_be_visible()
            expect(page.get_by_text(re.compile(r"Crash detected|Running\(\)"))).to_have_count(0)
            page.screenshot(path=out / f"{name}.png")

        page.goto(f"{ui}/artifacts/artifact/{card.id}")  # the live card, edited in place: its last status
        expect(page.get_by_text(re.compile("cancelled at step \\d+; checkpoint step \\d+ kept"))).to_be_visible()
        page.screenshot(path=out / "training-cancelled-card.png")

        page.goto(f"{ui}/runs")  # the list: parent and child, both Cancelled
        expect(page.get_by_text(f"train-{RUN}", exact=True).first).to_be_visible()
        page.screenshot(path=out / "training-cancelled-list.png")
        browser.close()
    for name in ("training-live-card", "training-live-run", "training-cancelled-run", "training-cancelled-logs",
                 "training-cancelled-parent-logs", "training-cancelled-card", "training-cancelled-list"):
        say(f"wrote {out / name}.png")


def artifacts(key: str) -> list:
    """The artifacts of `key`, newest version first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)


def run_state(flow_run_id) -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value if state else None


def deployment_registered(name: str) -> bool:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except Exception:  # the server is not up yet, or serve has not registered the deployments yet
        return False
    return True


def wait_for(condition, what: str, serve: subprocess.Popen, poll_s: float = 1.0):
    deadline = time.monotonic() + TIMEOUT_S
    while not (result := condition()):
        if serve.poll() is not None:
            sys.exit(f"error: tinyllama serve exited ({serve.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            sys.exit(f"error: timed out after {TIMEOUT_S} s waiting for {what}")
        time.sleep(poll_s)
    return result


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

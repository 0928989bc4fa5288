"""The `tinyllama` command line.

Every command prints `error: <file or URI>: <what>` on bad input (exit 2) or failure (exit 1),
with the traceback under `--debug` (or TINYLLAMA_DEBUG=1); Ctrl-C or SIGTERM stops a command's
work, marks its Prefect runs Cancelled and exits 130 (deployments/session.py). Configs are
validated before the flows (and torch, Ray, Prefect) are imported.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperOption

from deployments.errors import DEBUG_ENV, INTERRUPTED, Interrupted, debug_enabled, describe, exit_code
from deployments.settings import configure_prefect
from storage.config_file import read_config


class _Cli(typer.Typer):
    """The app, with errors for people: one line per error and an exit code that says what kind."""

    def __call__(self, *args, **kwargs):
        try:
            result = super().__call__(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:  # usage errors: click's own message, exit 2
            e.show()
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            sys.exit(INTERRUPTED)
        except Interrupted as e:
            print(e, file=sys.stderr)
            sys.exit(INTERRUPTED)
        except Exception as e:
            if debug_enabled():
                traceback.print_exc()
            for line in describe(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", None) or exit_code(e))
        sys.exit(result if isinstance(result, int) else 0)


_display_type_rich = TyperOption.display_type_rich


def _no_value_for_flags(option: TyperOption, ctx: click.Context) -> str | None:
    """typer 0.29's rich help gives every option a value column, flags too (`--debug <bool>`);
    its plain help, like click's, shows none for a flag: so does this one."""
    return None if option.is_flag or option.count else _display_type_rich(option, ctx)


TyperOption.display_type_rich = _no_value_for_flags

app = _Cli(
    help="Pretrain TinyLlama-class models: build datasets, train, export, and serve it all in the Prefect UI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog="Example: tinyllama demo   (then: tinyllama serve, and open http://127.0.0.1:4200)",
)

ApiUrl = Annotated[
    Optional[str],
    typer.Option(
        "--api-url",
        envvar="PREFECT_API_URL",
        help="Prefect API to record runs on (default: the one `tinyllama serve` runs, else a temporary one)",
        show_default=False,
    ),
]
ServedApiUrl = Annotated[
    Optional[str],
    typer.Option(
        "--api-url",
        envvar="PREFECT_API_URL",
        help="Prefect API of the server that serves the deployments (default: the one `tinyllama serve` runs; "
        "none is started)",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tinyllama {version('tinyllama-pipeline')}")
        except PackageNotFoundError:
            typer.echo("tinyllama (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main(
    data: Annotated[Path, typer.Option(help="Where generated data and Prefect's database go")] = Path("data"),
    debug: Annotated[bool, typer.Option("--debug", help=f"Show tracebacks (or set {DEBUG_ENV}=1)")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"
    configure_prefect(data)  # before any command imports prefect


def data_dir(ctx: typer.Context) -> Path:
    return ctx.find_root().params["data"]


@app.command("make-corpus", epilog="Example: tinyllama make-corpus data/raw --target-bytes 2000000")
def make_corpus(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the raw sample corpus")] = Path("data/raw"),
    target_bytes: Annotated[int, typer.Option(help="About this many bytes of text")] = 8 << 20,
    seed: Annotated[int, typer.Option(help="Seed of the generated documents")] = 42,
) -> None:
    """Make the sample corpus (SlimPajama-style jsonl.zst + Starcoder-style parquet) and its build config."""
    from demo.sample_corpus import make_sample_corpus

    summary = make_sample_corpus(out_dir, target_bytes=target_bytes, seed=seed)
    typer.echo(f"sample corpus in {out_dir}: {summary['documents']}")
    typer.echo(str(Path(out_dir) / "sample.yaml"))


@app.command("build-dataset", epilog="Example: tinyllama build-dataset data/raw/sample.yaml --output s3://bucket/prefix")
def build_dataset(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Build config (YAML)", dir_okay=False)],
    output: Annotated[Optional[str], typer.Option(help="Store URI overriding the config's output")] = None,
    api_url: ApiUrl = None,
) -> None:
    """Run the build-dataset flow; prints a summary and, as the last line, the manifest URI."""
    from tasks.config import BuildConfig

    build_config = read_config(config, BuildConfig, {"output": absolute(output)} if output else None)
    with flow_session(ctx, api_url) as session:
        from flows.build_dataset import build_dataset as flow

        manifest_uri = session.run(flow, build_config)
    print_manifest(manifest_uri)
    typer.echo(manifest_uri)


@app.command(epilog="Example: tinyllama inspect data/datasets/sample/<build>/manifest.json")
def inspect(manifest_uri: Annotated[str, typer.Argument(help="URI of a build's manifest.json")]) -> None:
    """Print a build's accounting and shards."""
    print_manifest(manifest_uri, shards=True)


@app.command(epilog="Example: tinyllama train run.yaml --max-steps-this-run 100")
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Run config (YAML)", dir_okay=False)],
    max_steps_this_run: Annotated[Optional[int], typer.Option(help="Advance the run by at most this many steps")] = None,
    start_over: Annotated[
        bool, typer.Option("--start-over", help="If no checkpoint of the run verifies, train from step 0 instead of "
                           "refusing (the corrupt ones are set aside, unchanged)")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """Run the train flow: train (or continue) the run described by CONFIG; prints the run URI."""
    from model.train_config import TrainConfig

    updates = {"max_steps_this_run": max_steps_this_run} if max_steps_this_run else {}
    if start_over:
        updates["start_over"] = True
    run_config = read_config(config, TrainConfig, updates)
    with flow_session(ctx, api_url) as session:
        from flows.train import train as train_flow

        typer.echo(session.run(train_flow, run_config))


@app.command("plan-train", epilog="Example: tinyllama plan-train run.yaml --nodes 8 --gpus-per-node 8 --mfu 0.45")
def plan_train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)", dir_okay=False)],
    nodes: Annotated[int, typer.Option(min=1, help="Nodes of the cluster")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs (ranks) per node")] = 8,
    mfu: Annotated[Optional[float], typer.Option(min=0.01, max=1.0, help="Assumed MFU (default: measured, else 0.4)")] = None,
    peak_tflops: Annotated[float, typer.Option(min=1.0, help="Dense bf16 peak per GPU (H100 SXM: 989)")] = 989.0,
) -> None:
    """Dry-run CONFIG on a cluster: per-rank memory, checkpoint size, step time, days to the token budget."""
    from model.train_config import TrainConfig

    run_config = read_config(config, TrainConfig)
    from model.plan import plan_training

    plan = plan_training(run_config, nodes, gpus_per_node, mfu, peak_tflops * 1e12)
    typer.echo(f"{config}: model {plan.total_params / 1e9:.2f}B parameters on {plan.world_size} ranks\n")
    typer.echo(plan.table())


@app.command("export-hf", epilog="Example: tinyllama export-hf data/runs/sample-tiny data/runs/sample-tiny/hf")
def export_hf(
    checkpoint_uri: Annotated[str, typer.Argument(help="A checkpoint folder, or a run folder (its newest checkpoint)")],
    out_dir: Annotated[Path, typer.Argument(help="Where the Hugging Face Llama directory goes")],
) -> None:
    """Export a checkpoint as a directory that transformers loads as LlamaForCausalLM; prints the
    checkpoint folder and its step, then (the last line) the directory."""
    from model.checkpoint import resolve_checkpoint
    from model.export import export_hf as export

    layout, checkpoint = resolve_checkpoint(checkpoint_uri)  # a run folder: its newest checkpoint, named here
    folder = layout.store.url(checkpoint.prefix)
    exported = export(folder, out_dir)
    typer.echo(f"exported {folder} (step {checkpoint.step})")
    typer.echo(str(exported))


@app.command(epilog="Example: tinyllama evaluate data/runs/sample-tiny --tasks tiny_mc --include-path demo/tiny_mc")
def evaluate(
    ctx: typer.Context,
    run_or_checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder, or a run folder (its newest checkpoint)")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names")],
    include_path: Annotated[Optional[str], typer.Option(help="Folder of task YAMLs (local data)")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per item")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many items per task")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass")] = 8,
    api_url: ApiUrl = None,
) -> None:
    """Run the evaluate flow (lm-evaluation-harness, offline) on a checkpoint; prints its metrics."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    with flow_session(ctx, api_url) as session:
        from flows.evaluate import evaluate as flow

        record = session.run(flow, absolute(run_or_checkpoint), names, include_path and absolute(include_path),
                             num_fewshot, limit, batch_size)
    typer.echo(f"{record['checkpoint']} (step {record['step']}, {record['tokens']} tokens)")
    for row in record["metrics"]:
        stderr = "" if row["stderr"] is None else f" ± {row['stderr']:.4f}"
        paper = "" if row["paper"] is None else f"  (TinyLlama 3T: {row['paper']:.4f})"
        typer.echo(f"  {row['task']:<24} {row['metric']:<10} {row['value']:.4f}{stderr}{paper}")


def print_manifest(uri: str, shards: bool = False) -> None:
    from storage.manifest import read_manifest, read_shard_table
    from storage.store import open_object

    store, key = open_object(uri)
    manifest = read_manifest(store, key)
    typer.echo(f"build {manifest.name}/{manifest.build_id}: {manifest.total_documents} documents, "
               f"{manifest.total_tokens} tokens in {manifest.shard_table.rows} shards ({manifest.dtype}), "
               f"tokenizer {manifest.tokenizer.sha256[:12]} vocab {manifest.tokenizer.vocab_size}")
    header = ["source", "docs_in", "kept", "filtered", "exact_dup", "near_dup", "malformed", "tokens"]
    typer.echo("  ".join(f"{h:>10}" for h in header))
    for name, acc in manifest.sources.items():
        values = [name] + [getattr(acc, h) for h in header[1:]]
        typer.echo("  ".join(f"{v:>10}" for v in values))
    if shards:
        typer.echo(f"{'shard':<40} {'documents':>10} {'tokens':>12} sha256(bin)")
        table = read_shard_table(store, key, manifest)
        for shard in map(table.shard, range(len(table))):
            typer.echo(f"{shard.prefix:<40} {shard.documents:>10} {shard.tokens:>12} {shard.bin.sha256[:16]}")


@app.command(epilog="Example: tinyllama --data /tmp/demo demo")
def demo(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="The same path on a smaller corpus for fewer steps (one to two minutes)")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """The whole pipeline on the embedded defaults: sample corpus, dataset, training, HF export, generation, evaluation."""
    with flow_session(ctx, api_url) as session:
        from deployments.demo import FULL, QUICK, run_demo

        run_demo(data_dir(ctx), QUICK if quick else FULL, run_flow=session.run, ui_url=session.ui_url)


@app.command(epilog="Example: tinyllama serve --port 4200 --epochs-on   (then open http://127.0.0.1:4200)")
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address the Prefect server listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the Prefect server (and UI)")] = 4200,
    build_config: Annotated[Optional[Path], typer.Option(help="Default build config of the deployments")] = None,
    train_config: Annotated[Optional[Path], typer.Option(help="Default run config of the deployments")] = None,
    epochs_on: Annotated[bool, typer.Option(help="Start the hourly train-epoch schedule switched on")] = False,
    train_after_build: Annotated[bool, typer.Option(help="Train when an on-demand build completes")] = True,
) -> None:
    """Start (or attach to) the Prefect server and serve the deployments; Ctrl-C stops everything."""
    from deployments.serve import serve_main

    serve_main(host, port, data_dir(ctx), build_config, train_config, epochs_on, train_after_build)


@app.command("submit-build", epilog="Example: tinyllama submit-build data/raw/sample.yaml --train-run sample-tiny --wait")
def submit_build(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Build config (YAML)", dir_okay=False)],
    output: Annotated[Optional[str], typer.Option(help="Store URI overriding the config's output")] = None,
    train_run: Annotated[
        Optional[str],
        typer.Option(help="The run the automation trains on this build (default: the deployment's run if it is new "
                     "or trains on this build, else a run named after the build)"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish, showing its progress")] = False,
    api_url: ServedApiUrl = None,
) -> None:
    """Start a build-dataset deployment run on the server `tinyllama serve` runs; prints its UI link.

    When the build completes, the train-on-build automation trains a run on it (see --train-run)."""
    from tasks.config import BuildConfig

    build = read_config(config, BuildConfig, {"output": absolute(output)} if output else None)
    from deployments.deploy import BUILD, submit
    from deployments.serve import running_server

    with running_server(data_dir(ctx), api_url):
        run = submit(BUILD, {"config": build.model_dump(mode="json"), "train_run": train_run or ""})
        report_submitted(run, wait)


@app.command("train-epoch", epilog="Example: tinyllama train-epoch sample-tiny --steps 50 --wait")
def train_epoch(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Name of the training run to continue")],
    output: Annotated[Optional[str], typer.Option(help="Store URI the run lives in (default: --data)")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps to advance the run by")] = 50,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish, showing its progress")] = False,
    api_url: ServedApiUrl = None,
) -> None:
    """Start one train-epoch deployment run on the server `tinyllama serve` runs: continue RUN by
    STEPS optimizer steps."""
    from deployments.deploy import TRAIN_EPOCH, submit
    from deployments.serve import running_server

    with running_server(data_dir(ctx), api_url):
        flow_run = submit(TRAIN_EPOCH, {"run": run, "output": absolute(output or str(data_dir(ctx))), "steps": steps})
        report_submitted(flow_run, wait)


def report_submitted(flow_run, wait: bool) -> None:
    """The run's state and UI link, once it ends if `wait` (its progress on stderr meanwhile); a run
    waited for that did not complete fails the command."""
    from deployments.deploy import flow_run_url
    from deployments.terminal import wait_for_run

    if wait:
        typer.echo(f"waiting for the run to end: {flow_run_url(flow_run)}", err=True)
        flow_run = wait_for_run(flow_run.id)
    typer.echo(f"{flow_run.state.name}: {flow_run_url(flow_run)}")
    if wait and not flow_run.state.is_completed():
        raise RuntimeError(f"the run ended {flow_run.state.name}: {flow_run.state.message or 'see its page'}")


def flow_session(ctx: typer.Context, api_url: str | None):
    """Where a command's flows run (see deployments/session.py)."""
    from deployments.session import flow_session as session

    return session(data_dir(ctx), api_url)


def absolute(uri: str) -> str:
    """The serve process reads paths from its own folder: send it absolute ones."""
    return uri if "://" in uri else str(Path(uri).resolve())


if __name__ == "__main__":
    app()

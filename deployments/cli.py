"""The `tinyllama` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deployments.settings import configure_prefect

app = typer.Typer(help="Pretrain TinyLlama-class models: build datasets, train, export.", no_args_is_help=True)


@app.callback()
def main(
    data: Annotated[Path, typer.Option(help="Where generated data and Prefect's database go")] = Path("data"),
) -> None:
    configure_prefect(data)  # before any command imports prefect


@app.command("make-corpus")
def make_corpus(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the raw sample corpus")] = Path("data/raw"),
    target_bytes: Annotated[int, typer.Option(help="About this many bytes of text")] = 8 << 20,
    seed: int = 42,
) -> None:
    """Make the sample corpus (SlimPajama-style jsonl.zst + Starcoder-style parquet) and its build config."""
    from tasks.sample_corpus import make_sample_corpus

    summary = make_sample_corpus(out_dir, target_bytes=target_bytes, seed=seed)
    typer.echo(f"sample corpus in {out_dir}: {summary['documents']}")
    typer.echo(str(Path(out_dir) / "sample.yaml"))


@app.command("build-dataset")
def build_dataset(
    config: Annotated[Path, typer.Argument(help="Build config (YAML)", exists=True, dir_okay=False)],
    output: Annotated[Optional[str], typer.Option(help="Store URI overriding the config's output")] = None,
) -> None:
    """Run the build-dataset flow; prints a summary and, as the last line, the manifest URI."""
    from flows.build_dataset import build_dataset as flow
    from tasks.config import BuildConfig

    build_config = BuildConfig.from_yaml(config)
    if output:
        build_config = build_config.model_copy(update={"output": output})
    manifest_uri = flow(build_config)
    print_manifest(manifest_uri)
    typer.echo(manifest_uri)


@app.command()
def inspect(manifest_uri: Annotated[str, typer.Argument(help="URI of a build's manifest.json")]) -> None:
    """Print a build's accounting and shards."""
    print_manifest(manifest_uri, shards=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)", exists=True, dir_okay=False)],
    max_steps_this_run: Annotated[Optional[int], typer.Option(help="Advance the run by at most this many steps")] = None,
) -> None:
    """Run the train flow: train (or continue) the run described by CONFIG; prints the run URI."""
    from flows.train import train as train_flow
    from model.train_config import TrainConfig

    run_config = TrainConfig.from_yaml(config)
    if max_steps_this_run:
        run_config = run_config.model_copy(update={"max_steps_this_run": max_steps_this_run})
    typer.echo(train_flow(run_config))


@app.command("plan-train")
def plan_train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML)", exists=True, dir_okay=False)],
    nodes: Annotated[int, typer.Option(min=1, help="Nodes of the cluster")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs (ranks) per node")] = 8,
    mfu: Annotated[Optional[float], typer.Option(min=0.01, max=1.0, help="Assumed MFU (default: measured, else 0.4)")] = None,
    peak_tflops: Annotated[float, typer.Option(min=1.0, help="Dense bf16 peak per GPU (H100 SXM: 989)")] = 989.0,
) -> None:
    """Dry-run CONFIG on a cluster: per-rank memory, checkpoint size, step time, days to the token budget."""
    from model.plan import plan_training
    from model.train_config import TrainConfig

    plan = plan_training(TrainConfig.from_yaml(config), nodes, gpus_per_node, mfu, peak_tflops * 1e12)
    typer.echo(f"{config}: model {plan.total_params / 1e9:.2f}B parameters on {plan.world_size} ranks\n")
    typer.echo(plan.table())


@app.command("export-hf")
def export_hf(
    checkpoint_uri: Annotated[str, typer.Argument(help="A checkpoint folder, or a run folder (its newest checkpoint)")],
    out_dir: Annotated[Path, typer.Argument(help="Where the Hugging Face Llama directory goes")],
) -> None:
    """Export a checkpoint as a directory that transformers loads as LlamaForCausalLM."""
    from model.export import export_hf as export

    typer.echo(str(export(checkpoint_uri, out_dir)))


@app.command()
def evaluate(
    run_or_checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder, or a run folder (its newest checkpoint)")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names")],
    include_path: Annotated[Optional[str], typer.Option(help="Folder of task YAMLs (local data)")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per item")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many items per task")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass")] = 8,
) -> None:
    """Run the evaluate flow (lm-evaluation-harness, offline) on a checkpoint; prints its metrics."""
    from flows.evaluate import evaluate as flow

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    record = flow(absolute(run_or_checkpoint), names, include_path and absolute(include_path), num_fewshot, limit,
                  batch_size)
    typer.echo(f"{record['checkpoint']} (step {record['step']}, {record['tokens']} tokens)")
    for row in record["metrics"]:
        stderr = "" if row["stderr"] is None else f" ± {row['stderr']:.4f}"
        paper = "" if row["paper"] is None else f"  (TinyLlama 3T: {row['paper']:.4f})"
        typer.echo(f"  {row['task']:<24} {row['metric']:<10} {row['value']:.4f}{stderr}{paper}")


def print_manifest(uri: str, shards: bool = False) -> None:
    from storage.manifest import DatasetManifest, read_record
    from storage.store import open_object

    manifest = read_record(*open_object(uri), DatasetManifest)
    typer.echo(f"build {manifest.name}/{manifest.build_id}: {manifest.total_documents} documents, "
               f"{manifest.total_tokens} tokens in {len(manifest.shards)} shards ({manifest.dtype}), "
               f"tokenizer {manifest.tokenizer.sha256[:12]} vocab {manifest.tokenizer.vocab_size}")
    header = ["source", "docs_in", "kept", "filtered", "exact_dup", "near_dup", "malformed", "tokens"]
    typer.echo("  ".join(f"{h:>10}" for h in header))
    for name, acc in manifest.sources.items():
        values = [name] + [getattr(acc, h) for h in header[1:]]
        typer.echo("  ".join(f"{v:>10}" for v in values))
    if shards:
        typer.echo(f"{'shard':<40} {'documents':>10} {'tokens':>12} sha256(bin)")
        for shard in manifest.shards:
            typer.echo(f"{shard.prefix:<40} {shard.documents:>10} {shard.tokens:>12} {shard.bin.sha256[:16]}")


@app.command()
def demo(ctx: typer.Context) -> None:
    """The whole pipeline on the embedded defaults: sample corpus, dataset, training, HF export, generation, evaluation."""
    from deployments.demo import run_demo

    run_demo(ctx.parent.params["data"])


@app.command()
def serve(
    ctx: typer.Context,
    host: str = "127.0.0.1",
    port: int = 4200,
    build_config: Annotated[Optional[Path], typer.Option(help="Default build config of the deployments")] = None,
    train_config: Annotated[Optional[Path], typer.Option(help="Default run config of the deployments")] = None,
    epochs_on: Annotated[bool, typer.Option(help="Start the hourly train-epoch schedule switched on")] = False,
    train_after_build: Annotated[bool, typer.Option(help="Train when an on-demand build completes")] = True,
) -> None:
    """Start (or attach to) the Prefect server and serve the deployments; Ctrl-C stops everything."""
    from deployments.serve import serve_main

    serve_main(host, port, ctx.parent.params["data"], build_config, train_config, epochs_on, train_after_build)


@app.command("submit-build")
def submit_build(
    config: Annotated[Path, typer.Argument(help="Build config (YAML)", exists=True, dir_okay=False)],
    output: Annotated[Optional[str], typer.Option(help="Store URI overriding the config's output")] = None,
    wait: bool = False,
) -> None:
    """Start a build-dataset deployment run on the served server; prints its UI link."""
    from deployments.deploy import BUILD, flow_run_url, submit
    from deployments.serve import running_server
    from tasks.config import BuildConfig

    build = BuildConfig.from_yaml(config)
    if output:
        build = build.model_copy(update={"output": absolute(output)})
    with running_server():
        run = submit(BUILD, {"config": build.model_dump(mode="json")}, wait=wait)
        typer.echo(f"{run.state.name}: {flow_run_url(run)}")


@app.command("train-epoch")
def train_epoch(run: str, output: str = "data", steps: int = 50, wait: bool = False) -> None:
    """Start one train-epoch deployment run: continue RUN by STEPS optimizer steps."""
    from deployments.deploy import TRAIN_EPOCH, flow_run_url, submit
    from deployments.serve import running_server

    with running_server():
        flow_run = submit(TRAIN_EPOCH, {"run": run, "output": absolute(output), "steps": steps}, wait=wait)
        typer.echo(f"{flow_run.state.name}: {flow_run_url(flow_run)}")


def absolute(uri: str) -> str:
    """The serve process reads paths from its own folder: send it absolute ones."""
    return uri if "://" in uri else str(Path(uri).resolve())


if __name__ == "__main__":
    app()

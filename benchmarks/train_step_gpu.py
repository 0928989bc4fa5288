"""Training-step throughput and MFU on one GPU: forward + backward + AdamW, bf16 autocast.

Compares attention backends (flash-attn's flash_attn_func, and PyTorch SDPA restricted to its
flash, cuDNN or memory-efficient kernel) with and without torch.compile, and prints a table.

    python -m benchmarks.train_step_gpu                      # tinyllama-1.1b, seq 2048, batch 4
    python -m benchmarks.train_step_gpu --preset small --steps 10 --compile off
    python -m benchmarks.train_step_gpu --device cpu --preset tiny --seq-len 128 --steps 3  # loop smoke test

Imports only torch and model/ (model/ needs pydantic for its config: carry its wheels to a
machine without it). MFU uses torchtitan's FLOPs per token and the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import Llama, LlamaConfig
from model import llama as llama_module
from model.flops import flops_per_token, mfu, peak_bf16_flops

# Row name -> (the model's attention backend, the SDPA kernel it is restricted to, if any).
BACKENDS: dict[str, tuple[str, SDPBackend | None]] = {
    "flash-attn": ("flash_attn", None),
    "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION),  # no GQA in this kernel (pytorch#139586)
    "sdpa": ("sdpa", None),  # PyTorch's own choice: the model's default without flash-attn
}


@dataclass
class Result:
    backend: str
    compiled: bool
    tokens_per_s: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    first_step_s: float | None = None  # includes compilation when compiled
    note: str = ""


def skip_reason(backend: str, device: str) -> str | None:
    attn_backend, sdpa_restriction = BACKENDS[backend]
    if attn_backend == "flash_attn" and llama_module.flash_attn_func is None:
        return "flash-attn not installed"
    if device != "cuda" and (attn_backend == "flash_attn" or sdpa_restriction is not None):
        return "CUDA only"
    return None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(
    args: argparse.Namespace, config: LlamaConfig, backend: str, compiled: bool, flops: int, peak: float | None
) -> Result:
    result = Result(backend, compiled)
    if reason := skip_reason(backend, args.device):
        result.note = reason
        return result
    attn_backend, sdpa_restriction = BACKENDS[backend]
    torch.manual_seed(0)
    model = Llama(config, attn_backend=attn_backend, activation_checkpointing=args.activation_checkpointing)
    model.to(args.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=args.device == "cuda"
    )
    step_model = torch.compile(model) if compiled else model
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=args.device)
    idx, targets = batch[:, :-1], batch[:, 1:]
    kernel = sdpa_kernel(sdpa_restriction) if sdpa_restriction is not None else contextlib.nullcontext()

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            _, loss = step_model(idx, targets, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with kernel:
            start = time.perf_counter()
            step()
            synchronize(args.device)
            result.first_step_s = time.perf_counter() - start
            for _ in range(args.warmup):
                step()
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(args.device)
            elapsed = time.perf_counter() - start
    except RuntimeError as e:  # no usable kernel, a compile failure, out of memory: report it in the table
        result.note = str(e).strip().splitlines()[0][:100]
        return result
    finally:
        del model, optimizer, step_model
        gc.collect()
        if compiled:
            torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result.step_ms = 1000 * elapsed / args.steps
    result.tokens_per_s = args.batch * args.seq_len * args.steps / elapsed
    if peak:
        result.mfu = mfu(result.tokens_per_s, flops, peak)
    if args.device == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return result


def table(results: list[Result]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        "| attention | compile | tokens/s | MFU | step ms | first step s | peak mem GiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        cells = [
            r.backend,
            "yes" if r.compiled else "no",
            fmt(r.tokens_per_s, ",.0f"),
            fmt(r.mfu, ".1%"),
            fmt(r.step_ms, ".1f"),
            fmt(r.first_step_s, ".1f"),
            fmt(r.peak_mem_gib, ".1f"),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=LlamaConfig.preset_names())
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of: {', '.join(BACKENDS)}")
    parser.add_argument("--compile", choices=["both", "on", "off"], default="both")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "train_step_gpu: no CUDA GPU here; this benchmark measures GPU training steps. "
            "To smoke-test the loop on a CPU: --device cpu --preset tiny --seq-len 128 --steps 3"
        )
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    config = LlamaConfig.preset(args.preset, max_seq_len=args.seq_len)
    with torch.device("meta"):
        flops = flops_per_token(Llama(config), args.seq_len)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_bf16_flops(device_name) if args.device == "cuda" else None
    print(
        f"{args.preset} | seq {args.seq_len} x batch {args.batch} | {device_name} | torch {torch.__version__} | "
        f"{flops / 1e9:.2f} GFLOP/token | peak bf16 {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}"
        f"{' | activation checkpointing' if args.activation_checkpointing else ''}",
        flush=True,
    )
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    results = []
    for compiled in compile_modes:
        for backend in backends:
            results.append(run_one(args, config, backend, compiled, flops, peak))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()

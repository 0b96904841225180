"""
Benchmarks: numbers measured side by side in one run, so the ratios hold on a noisy machine. Not tests.

    python bench.py train                                    # nanoGPT's shakespeare_char shape, fp32 vs bf16
    python bench.py train config/gpt2_124m.py --batch_size=1 --steps=5
    python bench.py train config/gpt2_124m.py --batch_size=1 --variants="grad_checkpoint=False;grad_checkpoint=True"
    python bench.py train --variants="compile=False;compile=True" --warmup=2

`train` times train.py's own train_step (forward, backward, clipping, fused AdamW) on random tokens, once per
variant (a set of --key=value overrides) in a fresh process, so each gets its own peak memory, alternating the
variants over --rounds. It reports tokens/s, MFU against the bf16 matmul rate this machine measures itself,
peak memory (CUDA: allocated; CPU: resident set growth), and each variant relative to the first.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model import ModelConfig, build_model, configure_optimizers, flops_per_token, num_params
from train import (MODEL_KEYS, TrainConfig, get_batch, parse_config, resolve_device, resolve_dtype, run_cli,
                   train_step)


@dataclass
class BenchConfig(TrainConfig):
    # the shape nanoGPT trains on shakespeare_char, at the batch size the CPU runs
    batch_size: int = 8
    block_size: int = 256
    vocab_size: int = 65
    steps: int = 10          # timed steps per round
    warmup: int = 3          # untimed steps first (allocator, kernel selection, compile)
    rounds: int = 2          # alternate the variants this many times; the median step time counts
    variants: str = 'dtype=float32;dtype=bfloat16'  # ';' between variants, ',' between overrides of one


def matmul_flops(dtype, device, n=2048, reps=10):
    """Best measured FLOP/s of an n x n x n matmul: the hardware rate that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_worker(cfg):
    """Time cfg.steps training steps in this process; print one JSON line."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})).to(device)
    model.grad_checkpoint = cfg.grad_checkpoint
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device.split(':')[0])
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=(dtype == 'float16'))
    step_model = torch.compile(model) if cfg.compile else model
    n = cfg.block_size * cfg.batch_size * (cfg.steps + cfg.warmup) * cfg.gradient_accumulation_steps + cfg.block_size + 1
    data = {'train': [np.random.default_rng(0).integers(0, cfg.vocab_size, n).astype(np.int64)]}
    times = []
    for it in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        batches = (get_batch(data, cfg, 'train', it, m, device, cfg.vocab_size - 1)
                   for m in range(cfg.gradient_accumulation_steps))
        loss = train_step(step_model, optimizer, scaler, batches, cfg.gradient_accumulation_steps, device, dtype,
                          cfg.grad_clip)
        loss.item()  # wait for the step to finish
        if it >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith('cuda') else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    print(json.dumps({'times': times, 'peak_bytes': peak, 'params': num_params(model),
                      'flops_per_token': flops_per_token(model, cfg.block_size)}))


def bench_train(argv):
    cfg = parse_config(BenchConfig, argv)
    device = resolve_device(cfg.device)
    variants = [v.strip() for v in cfg.variants.split(';') if v.strip()]
    for v in variants:  # check every override now, not after minutes of benchmarking
        parse_config(BenchConfig, [f'--{kv.strip()}' for kv in v.split(',')])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    peak = {d: matmul_flops(getattr(torch, d), device) for d in ('float32', 'bfloat16')}
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    print(f"bench train: {cfg.model_type} {cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}C, block {cfg.block_size}, "
          f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps}, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"measured matmul peak (2048^3): float32 {peak['float32'] / 1e12:.2f} TFLOP/s, "
          f"bfloat16 {peak['bfloat16'] / 1e12:.2f} TFLOP/s ({peak['bfloat16'] / peak['float32']:.1f}x)")
    base_args = [f'--{k}={v!r}' if isinstance(v, str) else f'--{k}={v}' for k, v in asdict(cfg).items()]
    results = {v: [] for v in variants}
    for _ in range(cfg.rounds):
        for v in variants:  # alternate, so a slow spell of the machine hits every variant alike
            args = base_args + [f'--{kv.strip()}' for kv in v.split(',')]
            p = subprocess.run([sys.executable, __file__, '_train_worker', *args], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f'error: the worker for {v} failed:\n{p.stderr[-2000:]}')
            results[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = {}
    for v, runs in results.items():
        step = statistics.median(t for r in runs for t in r['times'])
        tps = tokens / step
        rows[v] = dict(tokens_per_sec=tps, ms_per_step=1000 * step,
                       mfu_vs_bf16_peak=runs[0]['flops_per_token'] * tps / peak['bfloat16'],
                       peak_mem_mib=max(r['peak_bytes'] for r in runs) / 2**20)
    first = rows[variants[0]]
    print(f"{runs[0]['params'] / 1e6:.2f}M parameters, {runs[0]['flops_per_token'] / 1e6:.1f} MFLOPs/token")
    width = max(len(v) for v in variants) + 2
    print(f"{'variant':<{width}} {'tokens/s':>10} {'ms/step':>9} {'MFU(bf16 peak)':>15} {'peak mem MiB':>13} "
          f"{'speed':>7} {'memory':>7}")
    for v, r in rows.items():
        print(f"{v:<{width}} {r['tokens_per_sec']:>10,.0f} {r['ms_per_step']:>9.0f} {r['mfu_vs_bf16_peak']:>14.1%} "
              f"{r['peak_mem_mib']:>13,.0f} {r['tokens_per_sec'] / first['tokens_per_sec']:>6.2f}x "
              f"{r['peak_mem_mib'] / first['peak_mem_mib']:>6.2f}x")
    return rows


BENCHES = {'train': bench_train}


def main(argv):
    if argv[:1] == ['_train_worker']:
        return train_worker(parse_config(BenchConfig, argv[1:]))
    if not argv or argv[0] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [config.py] [--key=value ...]")
    BENCHES[argv[0]](argv[1:])


if __name__ == '__main__':
    run_cli(main)

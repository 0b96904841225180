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

    python bench.py bpe                                      # bpe.py vs Hugging Face tokenizers, vocab 1k/8k/32k
    python bench.py bpe --vocab_sizes=32000 --rounds=1 --naive_seconds=10

`bpe` times bpe.train against Hugging Face's Rust BPE trainer (one thread, same split regex) on Tiny
Shakespeare and a ~10 MB mix of the shared texts, each run in a fresh process for its peak memory; then
minbpe's recount-per-merge loop (time-capped and extrapolated), and encoding speed of the pure-Python encoder
and of the tiktoken export.

    python bench.py decode                                   # GPT-2 124M greedy decode vs transformers
    python bench.py decode --batch_sizes=1 --prompt_lens=16 --dtypes=bfloat16 --hf=False

`decode` times model.generate (KV cache, greedy, 128 new tokens) with PyTorch's stock Linear and with
model.pack_linears (oneDNN-packed weights, what sample.py uses on CPU) against transformers' generate() on the
same weights (exported with save_pretrained), at batch 1 and 8 and prompts of 16 and 512 tokens, in float32
and bfloat16 weights; and the weight bytes read per second against this machine's measured memory bandwidth.

    python bench.py finetune                                 # full vs LoRA vs QLoRA vs peft, GPT-2 124M shape

`finetune` times optimizer steps of finetune_lora.py's full, LoRA (r=8) and QLoRA modes and of the peft
library's LoRA on transformers' GPT-2 (pip install peft), each in a fresh process for its peak memory.

    python bench.py gguf                                     # SmolLM2-135M-Instruct from ../shared's Q4_1 GGUF
    python bench.py gguf --ppl_tokens=0 --ppl_context=1024 --ppl_stride=512 --report=gguf.json
    python bench.py gguf --rounds=1 --load_rounds=1 --new_tokens=4 --prompt_len=64 --ppl_tokens=2000  # a smoke run

`gguf` runs a GGUF model (weights.read_gguf + model_from_gguf, the tokenizer from its metadata) as ours in fp32,
bf16, int8 and int4 against transformers in fp32 on identical weights (transformers reads the same GGUF itself,
or with --hf_from=folder our save_pretrained export of it). Each variant in a fresh process, --load_rounds times:
seconds to load (file to model and tokenizer; ready = converted and packed too), and the peak resident memory of
loading, a prefill and a decode at the largest batch; transformers' load of the GGUF and of a saved HF folder
beside them. In one process, timed in turn over --rounds (the best counts): prefill tokens/s (generate one
token from a --prompt_len prompt of WikiText-2: the time to the first new token), and greedy decode tokens/s
at each batch size from --decode_prompt-token prompts (the time from the first new token to the last, so the
prefill is left out), with the weight bytes read per second against the measured memory bandwidth. Perplexity
on wiki.valid.tokens (its first --ppl_tokens tokens by the GGUF's tokenizer; 0 = all): ours through
train.eval_tokens, transformers through its own loop on the same windows (--ppl_context tokens, advancing by
--ppl_stride, each target scored once). Prints the CPU, its measured matmul peaks, markdown tables
with ratios against transformers' fp32 and our bf16, and the issue's targets; --report=FILE writes the JSON.

    python bench.py eval                                     # eval.py vs lm-evaluation-harness on SmolLM2
    python bench.py eval --limit=20 --mmlu_items=2 --pages=1             # a smoke run

`eval` scores SmolLM2 (the GGUF, dequantized) with eval.py and with lm-evaluation-harness's transformers backend
on the same weights (our save_pretrained export) and the same first --limit items of ../shared/data/eval's
HellaSwag, ARC-Easy, PIQA, Winogrande, MMLU (--mmlu_items per subject, 5-shot) and WikiText (--pages articles),
each task timed on its own; prints the scores side by side, the gap in points and the wall times.

    python bench.py ablate                                   # the quick start's switches, 10 minutes each
    python bench.py ablate --seeds=1,2 --variants=";optimizer=adamw"
    python bench.py ablate --config=config/pydocs_gpt2.py --minutes=0 --variants="optimizer=adamw;optimizer=muon,max_iters=300"

`ablate` trains config/shakespeare_char.py (or --config) in a fresh train.py process per variant and seed for a
fixed wall time (--max_minutes, so a slower variant gets fewer iterations; --minutes=0: the config's max_iters)
and prints each variant's final val loss and bits per byte with its curve, the mean over seeds and the change
against the first variant.

    python bench.py distill                                  # after python train.py config/chat/pretrain.py
    python bench.py distill --limit=200 --max_iters=50       # a smoke run

`distill` fine-tunes the pretrained student twice from the same start with the same steps of packed rows: on
the instruction set's own answers (SFT only) and on SmolLM2's answers to the same prompts (sequence-level
distillation; plus logit distillation when the student shares the teacher's tokenizer). Both are scored on
SmolLM2's answers to held-out prompts; it prints the held-out losses, the curves and the training tokens.
"""
import contextlib
import copy
import glob
import inspect
import io
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import bpe
from model import ModelConfig, build_model, flops_per_token, num_params, pack_linears
from train import (MODEL_KEYS, TrainConfig, autocast, cpu_has_fast_bf16, get_batch, make_optimizer, parse_config,
                   resolve_device, resolve_dtype, run_cli, train_step)


# The model shapes the benches build (all but train, which takes train.py's own config, and gguf, which reads its
# file), each stated once in ModelConfig's terms: kwargs for ModelConfig, so that what it derives (n_kv_head,
# intermediate_size) follows a bench's overrides of the other fields.
SHAPES = {
    'gpt2-124m': dict(model_type='gpt', n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      vocab_size=50257),  # GPT-2 small with its own (unpadded) vocabulary, as transformers has it
}
MODEL_FIELDS = set(asdict(ModelConfig()))


def parse_bench(cls, argv, shape, **defaults):
    """(cls config, ModelConfig, its overrides) for a bench: SHAPES[shape] with the bench's defaults and then every
    --key=value of argv that names a field of ModelConfig over it; the rest of argv parses into cls."""
    def is_model(arg):
        return arg.startswith('--') and arg[2:].partition('=')[0] in MODEL_FIELDS
    model_argv = [a for a in argv if is_model(a)]
    try:
        cfg = parse_config(cls, [a for a in argv if not is_model(a)])
    except Exception as e:  # train.UserError: an unknown key may be a mistyped field of ModelConfig
        if 'unknown config key' not in str(e):
            raise
        raise type(e)(f"{e}; or of ModelConfig: {', '.join(sorted(MODEL_FIELDS))}") from None
    given = parse_config(ModelConfig, model_argv)  # checks each value against the type of ModelConfig's field
    overrides = {**defaults, **{k: getattr(given, k) for k in (a[2:].partition('=')[0] for a in model_argv)}}
    return cfg, ModelConfig(**{**SHAPES[shape], **overrides}), overrides


@dataclass
class BenchConfig(TrainConfig):
    # the shape nanoGPT trains on shakespeare_char (train.py's defaults, with its 65 characters), at the batch size
    # the CPU runs
    batch_size: int = 8
    vocab_size: int = 65
    steps: int = 10          # timed steps per round
    warmup: int = 3          # untimed steps first (allocator, kernel selection, compile)
    rounds: int = 2          # alternate the variants this many times; the median step time counts
    variants: str = 'dtype=float32;dtype=bfloat16'  # ';' between variants, ',' between overrides of one


def matmul_flops(dtype, device, n=2048, reps=10):
    """Best measured FLOP/s of an n x n x n matmul: the hardware rate that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, spent = float('inf'), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        spent += time.perf_counter() - t0
        if spent > 20:  # an emulated dtype (bf16 on CPUs without bf16 instructions) takes ~20 s a product
            break
    return 2 * n ** 3 / best


def saved_for_backward(model, x, y, device, dtype):
    """Bytes of the activations one forward pass keeps for the backward pass (parameters not counted): the
    memory that gradient checkpointing trades for compute, measured exactly rather than from the noisy RSS."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


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
    optimizer = make_optimizer(model, cfg, device, dtype)
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
    saved = saved_for_backward(model, *get_batch(data, cfg, 'train', 0, 0, device, cfg.vocab_size - 1), device, dtype)
    print(json.dumps({'times': times, 'peak_bytes': peak, 'saved_bytes': saved, 'params': num_params(model),
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
                       peak_mem_mib=max(r['peak_bytes'] for r in runs) / 2**20,
                       saved_mib=runs[0]['saved_bytes'] / 2**20)
    first = rows[variants[0]]
    print(f"{runs[0]['params'] / 1e6:.2f}M parameters, {runs[0]['flops_per_token'] / 1e6:.1f} MFLOPs/token")
    width = max(len(v) for v in variants) + 2
    print(f"{'variant':<{width}} {'tokens/s':>10} {'ms/step':>9} {'MFU(bf16 peak)':>15} {'peak mem MiB':>13} "
          f"{'activations MiB':>16} {'speed':>7} {'memory':>7} {'activations':>12}")
    for v, r in rows.items():
        print(f"{v:<{width}} {r['tokens_per_sec']:>10,.0f} {r['ms_per_step']:>9.0f} {r['mfu_vs_bf16_peak']:>14.1%} "
              f"{r['peak_mem_mib']:>13,.0f} {r['saved_mib']:>16,.0f} {r['tokens_per_sec'] / first['tokens_per_sec']:>6.2f}x "
              f"{ratio(r['peak_mem_mib'], first['peak_mem_mib']):>7} {ratio(r['saved_mib'], first['saved_mib']):>12}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# bpe: bpe.py's trainer against Hugging Face tokenizers (Rust) and minbpe's recount-per-merge loop; encode speed


@dataclass
class BPEBenchConfig:
    vocab_sizes: str = '1000,8000,32000'
    corpus_mb: float = 10.0       # WikiText-2 valid + the PEPs + Tiny Shakespeare, paragraphs shuffled, repeated
    rounds: int = 3               # alternate bpe.py and HF this many times; the median time counts
    naive_seconds: float = 30.0   # time cap for the recount-per-merge trainer, which is then extrapolated
    encode_mb: float = 2.0        # encode speed on the first encode_mb MB of the mixed corpus
    shared_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data')


def bpe_corpus(shared_dir, mb):
    """A deterministic text of about mb MB: the paragraphs of WikiText-2 valid, the PEPs and Tiny Shakespeare,
    shuffled with seed 0, as many times over as it takes."""
    files = [os.path.join(shared_dir, name) for name in ('wikitext2/wiki.valid.tokens', 'tinyshakespeare.txt')]
    files += sorted(glob.glob(os.path.join(shared_dir, 'docs', 'peps', '*.rst')))
    paragraphs = []
    for path in files:
        with open(path, encoding='utf-8') as f:
            paragraphs += f.read().split('\n\n')
    rng, out, size = random.Random(0), [], 0
    while size < mb * 1e6:
        rng.shuffle(paragraphs)
        for p in paragraphs:
            out.append(p)
            size += len(p.encode()) + 2
            if size >= mb * 1e6:
                break
    return '\n\n'.join(out)


def naive_bpe_train(chunks, n_merges, seconds):
    """minbpe's training loop: after every merge, recount every pair of the whole text (chunks: lists of byte
    values). Stops after `seconds`; returns (merges done, bytes left in the text)."""
    import time
    t0, next_id = time.perf_counter(), 256
    for k in range(n_merges):
        if time.perf_counter() - t0 > seconds:
            return k, sum(map(len, chunks))
        counts = {}
        for chunk in chunks:
            for pair in zip(chunk, chunk[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        a, b = max(counts, key=counts.get)
        for j, chunk in enumerate(chunks):
            out, i = [], 0
            while i < len(chunk):
                if i < len(chunk) - 1 and chunk[i] == a and chunk[i + 1] == b:
                    out.append(next_id)
                    i += 2
                else:
                    out.append(chunk[i])
                    i += 1
            chunks[j] = out
        next_id += 1
    return n_merges, sum(map(len, chunks))


def bpe_worker(task, path, vocab_size, model, extra):
    """One measurement in a fresh process (see run_bpe_worker); prints one JSON line. Tasks: 'bpe.py' and 'HF'
    train (bpe.py also saves to model), 'naive' runs naive_bpe_train for extra seconds, 'encode' times both
    encoders of model on the first extra MB of path."""
    import json, resource, time
    import bpe
    result = {}
    if task == 'HF':
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE())  # split by the same regex, then bytes mapped to characters as GPT-2 does
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(bpe.GPT4_SPLIT_PATTERN), behavior='isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bpe.ENDOFTEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t0 = time.perf_counter()
        hf.train([path], trainer)
        result = dict(seconds=time.perf_counter() - t0, vocab=hf.get_vocab_size())
    elif task == 'bpe.py':
        t0 = time.perf_counter()
        tok = bpe.train([path], vocab_size, pattern=bpe.GPT4_SPLIT_PATTERN, progress=False)
        result = dict(seconds=time.perf_counter() - t0, vocab=tok.vocab_size)
        tok.save(model)
    elif task == 'naive':
        with open(path, encoding='utf-8') as f:
            chunks = [list(c.encode()) for c in bpe.chunker(bpe.GPT4_SPLIT_PATTERN)(f.read())]
        size = sum(map(len, chunks))
        t0 = time.perf_counter()
        merges, size_left = naive_bpe_train(chunks, vocab_size - 257, float(extra))
        result = dict(seconds=time.perf_counter() - t0, merges=merges, shrink=size_left / size)
    elif task == 'encode':
        with open(path, 'rb') as f:
            text = f.read(int(float(extra) * 1e6)).decode('utf-8', 'ignore')
        tok = bpe.Tokenizer.load(model)
        enc = tok.to_tiktoken()
        t0 = time.perf_counter()
        ids = tok.encode_ordinary(text)
        t1 = time.perf_counter()
        same = enc.encode_ordinary(text) == ids
        t2 = time.perf_counter()
        mb = len(text.encode()) / 1e6
        result = dict(python_mb_per_s=mb / (t1 - t0), tiktoken_mb_per_s=mb / (t2 - t1), same_ids=same, mb=mb)
    try:  # VmHWM, the peak of this program alone: ru_maxrss keeps the parent's (torch-sized) peak across fork + exec
        with open('/proc/self/status') as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM'))
    except (OSError, StopIteration):
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({**result, 'peak_mib': peak_kib / 1024}))


def run_bpe_worker(task, path, vocab_size=0, model='', extra=0):
    """bpe_worker in a fresh Python that imports neither torch nor numpy (its source is sent with -c), so its
    peak resident memory is the tokenizer's own. Hugging Face's trainer gets one thread, as Python has."""
    code = f"{inspect.getsource(naive_bpe_train)}\n{inspect.getsource(bpe_worker)}\n" \
           f"bpe_worker(*{[task, path, vocab_size, model, extra]!r})"
    p = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, env={**os.environ, 'RAYON_NUM_THREADS': '1'})
    if p.returncode:
        sys.exit(f'error: the {task} worker failed:\n{p.stderr[-2000:]}')
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_bpe(argv):
    cfg = parse_config(BPEBenchConfig, argv)
    vocab_sizes = [int(v) for v in cfg.vocab_sizes.split(',')]
    shakespeare = os.path.join(cfg.shared_dir, 'tinyshakespeare.txt')
    if not os.path.isfile(shakespeare):
        sys.exit(f'error: {shakespeare} not found: bench.py bpe reads ../shared/data (or set --shared_dir)')
    import tokenizers
    print(f"bench bpe: both trainers split with tiktoken's cl100k pattern and run on one thread (Hugging Face "
          f"tokenizers {tokenizers.__version__} with RAYON_NUM_THREADS=1); seconds of the train call (reading, "
          f"splitting, counting, merging), median of {cfg.rounds} interleaved rounds; MiB = the process's peak "
          f"resident memory")
    work = tempfile.mkdtemp(prefix='bench_bpe_')
    try:
        mixed = os.path.join(work, 'mixed.txt')
        with open(mixed, 'w', encoding='utf-8') as f:
            f.write(bpe_corpus(cfg.shared_dir, cfg.corpus_mb))
        corpora = {'tinyshakespeare': shakespeare, 'mixed': mixed}
        print(f"{'corpus':<16} {'MB':>5} {'vocab':>6} {'bpe.py s':>9} {'HF s':>7} {'bpe.py/HF':>10} "
              f"{'bpe.py MiB':>11} {'HF MiB':>7}")
        rows = {}
        for name, path in corpora.items():
            for v in vocab_sizes:
                model = os.path.join(work, f'{name}.{v}.model')
                runs = {'bpe.py': [], 'HF': []}
                for r in range(cfg.rounds):  # alternate who goes first, so a slow spell hits both alike
                    for task in (('bpe.py', 'HF') if r % 2 == 0 else ('HF', 'bpe.py')):
                        runs[task].append(run_bpe_worker(task, path, v, model))
                ours, hf = ({k: statistics.median(r[k] for r in runs[t]) for k in ('seconds', 'peak_mib', 'vocab')}
                            for t in ('bpe.py', 'HF'))
                rows[name, v] = dict(ours=ours, hf=hf, model=model)
                short = f"  (vocab reached: {ours['vocab']:.0f} / {hf['vocab']:.0f})" if ours['vocab'] < v else ''
                print(f"{name:<16} {os.path.getsize(path) / 1e6:>5.1f} {v:>6} {ours['seconds']:>9.2f} "
                      f"{hf['seconds']:>7.2f} {ours['seconds'] / hf['seconds']:>9.2f}x {ours['peak_mib']:>11.0f} "
                      f"{hf['peak_mib']:>7.0f}{short}")
        # minbpe's recount-per-merge loop is far too slow to finish: time-capped, then extrapolated. A merge costs
        # time in proportion to the text's length, which shrinks as merges go on: hence a range
        v = min(vocab_sizes)
        naive = run_bpe_worker('naive', shakespeare, v, extra=cfg.naive_seconds)
        with open(shakespeare, encoding='utf-8') as f:
            text = f.read()
        final = len(bpe.Tokenizer.load(rows['tinyshakespeare', v]['model']).encode_ordinary(text)) / len(text.encode())
        whole_text = naive['seconds'] / naive['merges'] / ((1 + naive['shrink']) / 2)  # s per merge at full length
        merges, ours = v - 257, rows['tinyshakespeare', v]['ours']['seconds']
        low, high = whole_text * merges * final, whole_text * merges
        print(f"recount-per-merge (minbpe's loop), tinyshakespeare, vocab {v}: {naive['merges']} of {merges} merges "
              f"in {naive['seconds']:.0f}s; all would take {low:.0f}-{high:.0f}s (the text shrinks to {final:.0%} of "
              f"its bytes); bpe.py takes {ours:.2f}s: {low / ours:,.0f}-{high / ours:,.0f}x faster")
        big = rows['mixed', max(vocab_sizes)]
        enc = run_bpe_worker('encode', mixed, model=big['model'], extra=cfg.encode_mb)
        print(f"encode {enc['mb']:.1f} MB of the mixed corpus with the {max(vocab_sizes)}-token bpe.py tokenizer, one "
              f"thread: pure Python {enc['python_mb_per_s']:.2f} MB/s, tiktoken export {enc['tiktoken_mb_per_s']:.1f} "
              f"MB/s, identical ids: {'yes' if enc['same_ids'] else 'NO'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = [  # the issue's targets, checked at whatever sizes this run measured
        (f"mixed vocab {max(vocab_sizes)} within 1.3x of HF", big['ours']['seconds'] / big['hf']['seconds'], 1.3, 'x'),
        (f"tinyshakespeare vocab {v} under 1.5 s", ours, 1.5, 's'),
        ("over 100x faster than recount-per-merge", low / ours, 100, 'x'),
        ("peak memory under 500 MiB", max(r['ours']['peak_mib'] for r in rows.values()), 500, ' MiB'),
        ("tiktoken export encodes at 5 MB/s or more", enc['tiktoken_mb_per_s'], 5, ' MB/s')]
    for what, value, limit, unit in targets:
        met = value >= limit if 'faster' in what or 'MB/s' in unit else value < limit
        print(f"target {what}: {value:,.2f}{unit} {'met' if met else 'MISSED'}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# decode: model.generate with the KV cache against transformers' generate() on the same weights


@dataclass
class DecodeBenchConfig:
    # the model: SHAPES['gpt2-124m'], any field of ModelConfig overridable (--n_layer=2); any gpt or llama shape
    # works (transformers gets the same weights through save_pretrained)
    batch_sizes: str = '1,8'
    prompt_lens: str = '16,512'
    new_tokens: int = 128
    dtypes: str = 'float32,bfloat16'
    rounds: int = 2              # alternate ours and transformers this many times; the best time counts
    hf: bool = True              # also time transformers (needs it installed: requirements-dev.txt)
    num_threads: int = 0
    seed: int = 1337


def memory_bandwidth(gib=1, reps=5):
    """Best bytes/s of reading a large float32 array (a sum), and of copying one (bytes read + written)."""
    x = torch.ones(gib * 2**28)
    y = torch.empty_like(x)
    read = copy = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        y.copy_(x)
        t2 = time.perf_counter()
        read, copy = min(read, t1 - t0), min(copy, t2 - t1)
    return x.nbytes / read, 2 * x.nbytes / copy


def weight_bytes_per_token(model):
    """Bytes of weights one decode step reads: every matrix once (tied ones once), but of the embedding
    tables only the rows of the token and position (the tied output head reads the token table whole)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() not in seen and not name.endswith('wpe.weight'):
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def time_generate(fn, reps):
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_decode(argv):
    cfg, mcfg, given = parse_bench(DecodeBenchConfig, argv, 'gpt2-124m')
    if 'bias' not in given:
        mcfg.bias = mcfg.model_type == 'gpt'  # llama has none
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    ours = build_model(mcfg).eval()
    hf = transformers = None
    if cfg.hf:
        import transformers

        import weights
        work = tempfile.mkdtemp()
        weights.save_pretrained(ours, work)  # identical weights, through our own exporter
        hf = transformers.AutoModelForCausalLM.from_pretrained(work).eval()
        shutil.rmtree(work, ignore_errors=True)
    read_bw, copy_bw = memory_bandwidth()
    print(f"bench decode: {mcfg.model_type} {mcfg.n_layer}L {mcfg.n_head}H {mcfg.n_embd}C, vocab {mcfg.vocab_size}, "
          f"{num_params(ours) / 1e6:.1f}M parameters, greedy, {cfg.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", transformers {transformers.__version__}" if hf is not None else ''))
    print(f"memory bandwidth: read {read_bw / 1e9:.1f} GB/s, copy {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(f"{'dtype':<9} {'batch':>5} {'prompt':>6} {'stock':>8} {'packed':>8} {'hf':>8} {'packed/hf':>9} "
          f"{'weights GB/s':>12} {'of read bw':>10} {'same tokens':>11}")
    rows = {}
    for dtype in cfg.dtypes.split(','):
        stock = copy.deepcopy(ours).to(getattr(torch, dtype))
        packed = pack_linears(copy.deepcopy(stock))
        if hf is not None:
            hf.to(getattr(torch, dtype))
        wbytes = weight_bytes_per_token(stock)
        for B in map(int, cfg.batch_sizes.split(',')):
            for T in map(int, cfg.prompt_lens.split(',')):
                x = torch.randint(0, mcfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
                runs = {'stock': lambda: stock.generate(x, cfg.new_tokens, temperature=0),
                        'packed': lambda: packed.generate(x, cfg.new_tokens, temperature=0)}
                if hf is not None:
                    runs['hf'] = lambda: hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                     max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                                     pad_token_id=0)
                best, out = {k: float('inf') for k in runs}, {}
                with torch.no_grad():
                    stock.generate(x, 2, temperature=0)  # warm up the allocator and kernel choices
                    packed.generate(x, 2, temperature=0)
                    if hf is not None:
                        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False,
                                    pad_token_id=0)
                    for _ in range(cfg.rounds):  # alternate, so a slow spell hits every contender alike
                        for k, fn in runs.items():
                            t0 = time.perf_counter()
                            out[k] = fn()
                            best[k] = min(best[k], time.perf_counter() - t0)
                r = {k: B * cfg.new_tokens / t for k, t in best.items()}
                r['weights_gbs'] = wbytes * cfg.new_tokens / best['packed'] / 1e9
                r['same'] = (out['packed'][:, T:] == out['hf'][:, T:]).float().mean().item() if hf is not None else None
                rows[dtype, B, T] = r
                hf_s = f"{r['hf']:>8.1f} {r['packed'] / r['hf']:>8.2f}x" if hf is not None else f"{'-':>8} {'-':>9}"
                same = '-' if r['same'] is None else f"{r['same']:.0%}"
                print(f"{dtype:<9} {B:>5} {T:>6} {r['stock']:>8.1f} {r['packed']:>8.1f} {hf_s} {r['weights_gbs']:>12.1f} "
                      f"{r['weights_gbs'] * 1e9 / read_bw:>10.0%} {same:>11}", flush=True)
    print("tokens/s: new tokens over the whole generate() call, prefill included. stock: model.generate with "
          "PyTorch's Linear; packed: with model.pack_linears, as sample.py runs on CPU; hf: transformers' generate(). "
          "weights GB/s: bytes of weights one step reads x steps/s of packed, against the read bandwidth above")
    f32, b16 = rows.get(('float32', 1, 16)), rows.get(('bfloat16', 1, 16))
    if f32 and f32['hf']:
        print(f"target fp32 batch 1 >= 1.1x transformers: {f32['packed'] / f32['hf']:.2f}x "
              f"{'met' if f32['packed'] >= 1.1 * f32['hf'] else 'MISSED'}")
    if f32:
        frac = f32['weights_gbs'] * 1e9 / read_bw
        print(f"target fp32 batch 1 >= 80% of read bandwidth: {frac:.0%} {'met' if frac >= 0.8 else 'MISSED'}")
    if b16 and f32 and f32['hf']:
        print(f"target bf16 batch 1 >= 1.8x transformers' fp32: {b16['packed'] / f32['hf']:.2f}x "
              f"{'met' if b16['packed'] >= 1.8 * f32['hf'] else 'MISSED'}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# finetune: full vs LoRA vs QLoRA (finetune_lora.py) and peft's LoRA on the same transformers model


@dataclass
class FinetuneBenchConfig:
    # the model: SHAPES['gpt2-124m'] at block_size 256 (the sequence length), any field of ModelConfig overridable
    batch_size: int = 4
    steps: int = 5
    warmup: int = 2
    lora_r: int = 8
    lora_targets: str = 'all'    # attention and MLP matrices (peft: c_attn, c_proj, c_fc)
    dtype: str = 'bfloat16'      # autocast dtype; weights and adapters stay float32 (QLoRA's base: NF4)
    variants: str = 'full,lora,qlora,peft'
    num_threads: int = 0


def finetune_worker(cfg, mcfg, variant):
    """Time cfg.steps optimizer steps of one variant on a model of mcfg's shape in this process; print one JSON
    line."""
    from finetune_lora import apply_lora, count_params, frozen_to
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    if variant == 'peft':
        import peft
        import transformers
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd, vocab_size=mcfg.vocab_size,
            n_positions=mcfg.block_size))
        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                                           target_modules=['c_attn', 'c_proj', 'c_fc'],
                                                           fan_in_fan_out=True))
        run = lambda x, y: model(input_ids=x, labels=y).loss  # noqa: E731
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        model = build_model(mcfg)
        if variant != 'full':
            apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=2 * cfg.lora_r, qlora=variant == 'qlora')
            frozen_to(model, cfg.dtype)  # as finetune_lora.py does
        run = lambda x, y: model(x, y)[1]  # noqa: E731
        trainable = count_params(model)[0]
    model.train()
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                       list(model.parameters()) + list(model.buffers())}.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for it in range(cfg.warmup + cfg.steps):
        x = torch.randint(0, mcfg.vocab_size, (cfg.batch_size, mcfg.block_size), generator=g)
        t0 = time.perf_counter()
        with autocast('cpu', cfg.dtype):
            loss = run(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    print(json.dumps({'step': statistics.median(times), 'peak_bytes': peak, 'weight_bytes': weight_bytes,
                      'trainable': trainable}))


def bench_finetune(argv):
    cfg, mcfg, given = parse_bench(FinetuneBenchConfig, argv, 'gpt2-124m', block_size=256)
    variants = cfg.variants.split(',')
    print(f"bench finetune: GPT-2 shape {mcfg.n_layer}L {mcfg.n_embd}C vocab {mcfg.vocab_size}, batch "
          f"{cfg.batch_size} x {mcfg.block_size}, {cfg.dtype} autocast, LoRA r={cfg.lora_r} on {cfg.lora_targets}, median of {cfg.steps} "
          f"steps, each variant in a fresh process (peak memory: resident set growth after imports)")
    rows = {}
    for v in variants:
        args = [f'--{k}={val}' for k, val in asdict(cfg).items()] + [f'--{k}={val!r}' for k, val in given.items()]
        p = subprocess.run([sys.executable, __file__, '_finetune_worker', v, *args], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f'error: the {v} worker failed:\n{p.stderr[-2000:]}')
        rows[v] = json.loads(p.stdout.strip().splitlines()[-1])
    full = rows.get('full')
    print(f"{'variant':<8} {'trainable':>12} {'ms/step':>9} {'peak MiB':>9} {'weights MiB':>12} {'peak vs full':>13} "
          f"{'weights vs full':>16}")
    for v, r in rows.items():
        rel = (f"{r['peak_bytes'] / full['peak_bytes']:>12.0%} {r['weight_bytes'] / full['weight_bytes']:>16.0%}"
               if full else '')
        print(f"{v:<8} {r['trainable']:>12,} {1000 * r['step']:>9.0f} {r['peak_bytes'] / 2**20:>9,.0f} "
              f"{r['weight_bytes'] / 2**20:>12,.0f} {rel}")
    if full and 'lora' in rows:
        x = rows['lora']['peak_bytes'] / full['peak_bytes']
        print(f"target LoRA peak memory <= 60% of full: {x:.0%} {'met' if x <= 0.6 else 'MISSED'}")
    if full and 'qlora' in rows:
        x = rows['qlora']['weight_bytes'] / full['weight_bytes']
        print(f"target QLoRA weight memory <= 30% of fp32: {x:.0%} {'met' if x <= 0.3 else 'MISSED'}")
    if 'lora' in rows and 'peft' in rows:
        x = rows['lora']['step'] / rows['peft']['step']
        print(f"target LoRA step time <= peft's: {x:.2f}x {'met' if x <= 1 else 'MISSED'}")
    return rows


@dataclass
class QuantizeBenchConfig:
    init_from: str = 'out-shakespeare-char'  # a trained run (python train.py config/shakespeare_char.py); '' = skip
    eval_data: str = ''          # '' = the run's own data_dir
    max_eval_tokens: int = 100_000
    # then SHAPES['gpt2-124m'] (any field of ModelConfig overridable), random weights: size and speed (perplexity
    # means nothing)
    new_tokens: int = 128        # greedy decode, batch 1, prompt 16, best of rounds
    rounds: int = 3
    group_size: int = 64
    variants: str = 'int8,dynamic,int4,nf4,prune'
    num_threads: int = 0


def quantized_variant(model, variant, group_size):
    """A quantized (or 50%-pruned) copy of model and its save plan."""
    import quantize
    m = copy.deepcopy(model)
    if variant == 'prune':
        return m, dict(scheme=None, pruned=list(quantize.prune(m, 0.5)))
    return m, quantize.quantize_model(m, variant, group_size)


def interleaved_speed(models, new_tokens, rounds):
    """Decode tokens/s of each model, timed in turn round after round (best per model), so that the machine's
    slow spells hit every variant alike."""
    import quantize
    for m in models.values():
        quantize.decode_speed(m, 4, rounds=1)  # warm-up: kernels' first-call packing
    best = {v: 0.0 for v in models}
    for _ in range(rounds):
        for v, m in models.items():
            best[v] = max(best[v], quantize.decode_speed(m, new_tokens, rounds=1))
    return best


def bench_quantize(argv):
    import quantize
    from train import eval_data_tokens, eval_tokens, load_model
    cfg, mcfg, _ = parse_bench(QuantizeBenchConfig, argv, 'gpt2-124m')
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    variants = cfg.variants.split(',')
    results = {}
    if cfg.init_from:  # a trained model: what each scheme costs in perplexity
        model, tok = load_model(cfg.init_from)
        qcfg = quantize.QuantizeConfig(max_eval_tokens=cfg.max_eval_tokens,
                                       eval_data=cfg.eval_data or quantize.default_eval_data(cfg.init_from))
        ids = eval_data_tokens(qcfg, tok)
        print(f"bench quantize: {cfg.init_from} ({num_params(model) / 1e6:.1f}M parameters), val perplexity on "
              f"{len(ids):,} tokens of {qcfg.eval_data}; decode batch 1, {cfg.new_tokens} new tokens, "
              f"variants timed in turn, best of {cfg.rounds}")
        models, rows = {'fp32': copy.deepcopy(model)}, {'fp32': {'size_bytes': quantize.file_bytes(model)}}
        for v in variants:
            models[v], plan = quantized_variant(model, v, cfg.group_size)
            rows[v] = {'size_bytes': quantize.file_bytes(models[v], plan)}
        for v, m in models.items():
            rows[v].update(weight_bytes=quantize.weight_bytes(m), val_ppl=eval_tokens(m, ids)['ppl'])
            pack_linears(m)  # as sample.py decodes on CPU
        for v, tps in interleaved_speed(models, cfg.new_tokens, cfg.rounds).items():
            rows[v]['tokens_per_sec'] = tps
        print_quantize_table(rows, ppl=True)
        results['trained'] = rows
        del models
    # the GPT-2 124M shape: size and decode speed at scale, and how far each scheme moves the logits
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    x = torch.randint(0, mcfg.vocab_size, (1, 64))
    with torch.no_grad():
        ref = model(x)[0]
    print(f"\nGPT-2 124M shape, random weights: greedy decode batch 1, prompt 16, {cfg.new_tokens} new tokens, timed "
          f"in turn, best of {cfg.rounds}; logits error = ||logits - fp32's|| / ||fp32's|| on 64 tokens")
    models, rows = {}, {}
    for v in ['fp32 stock', 'fp32', 'bf16'] + variants:
        if v in ('fp32 stock', 'fp32', 'bf16'):
            m, plan = copy.deepcopy(model).to(torch.bfloat16 if v == 'bf16' else torch.float32), None
        else:
            m, plan = quantized_variant(model, v, cfg.group_size)
        rows[v] = {'size_bytes': quantize.file_bytes(m, plan), 'weight_bytes': quantize.weight_bytes(m)}
        with torch.no_grad():
            rows[v]['logits_error'] = ((m(x)[0].float() - ref).norm() / ref.norm()).item()
        if v != 'fp32 stock':  # as sample.py decodes on CPU: full-precision Linears packed for oneDNN
            pack_linears(m)
        models[v] = m
    for v, tps in interleaved_speed(models, cfg.new_tokens, cfg.rounds).items():
        rows[v]['tokens_per_sec'] = tps
    del models
    print_quantize_table(rows, ppl=False)
    results['gpt2_124m_shape'] = rows
    r, base = rows, rows['fp32']
    if 'int8' in r:
        x8 = r['int8']['tokens_per_sec'] / base['tokens_per_sec']
        print(f"target int8 decode >= 2x our fp32 (sample.py's packed path): {x8:.2f}x {'met' if x8 >= 2 else 'MISSED'}"
              f" ({r['int8']['tokens_per_sec'] / r['fp32 stock']['tokens_per_sec']:.2f}x the stock fp32 path)")
        s8 = base['size_bytes'] / r['int8']['size_bytes']
        print(f"target int8 file >= 3.8x smaller: {s8:.2f}x {'met' if s8 >= 3.8 else 'MISSED'}")
    if 'int4' in r:
        s4 = base['size_bytes'] / r['int4']['size_bytes']
        print(f"target int4 file >= 6x smaller: {s4:.2f}x {'met' if s4 >= 6 else 'MISSED'}")
    if 'trained' in results:
        t = results['trained']
        for v, limit in (('int8', 0.005), ('int4', 0.05)):
            if v in t:
                d = t[v]['val_ppl'] / t['fp32']['val_ppl'] - 1
                print(f"target {v} perplexity within +{limit:.1%}: {d:+.2%} {'met' if d <= limit else 'MISSED'}")
    return results


def print_quantize_table(rows, ppl):
    base = rows['fp32']
    cols = [('file MB', 'size_bytes', 1e-6, '{:9.1f}'), ('weights MB', 'weight_bytes', 1e-6, '{:10.1f}')]
    cols += [('val ppl', 'val_ppl', 1, '{:8.3f}')] if ppl else [('logits err', 'logits_error', 1, '{:10.4f}')]
    cols += [('tok/s', 'tokens_per_sec', 1, '{:7.1f}')]
    print(f"{'variant':<11}" + ''.join(f" {c[0]:>{len(c[3].format(0))}} {'x':>6}" for c in cols))
    for v, r in rows.items():
        line = f"{v:<11}"
        for _, key, unit, fmt in cols:
            rel = r[key] / base[key] if base[key] else float('nan')
            line += ' ' + fmt.format(r[key] * unit) + f" {rel:6.3f}"
        print(line)


@dataclass
class RagBenchConfig:
    qa: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'qa',
                           'pubmedqa_ori_pqal.json')
    embed_from: str = ''         # a checkpoint for the dense and hybrid rows; '' = BM25 only
    tune_steps: int = 400        # rag.py tune on the chunks first (0 = embed with embed_from as it is)
    dense_weight: float = 1.0    # hybrid: the dense ranking's weight in reciprocal rank fusion
    rounds: int = 3              # the best time of each library counts


def bench_rag(argv):
    """PubMedQA-L: each question's abstract is a document; a retrieved chunk is a hit when it comes from that
    question's abstract. BM25 index build and queries against rank_bm25 and bm25s on the same chunks."""
    import rag
    cfg = parse_config(RagBenchConfig, argv)
    if not os.path.isfile(cfg.qa):
        sys.exit(f"error: no PubMedQA file at {cfg.qa} (../shared/data/qa/pubmedqa_ori_pqal.json)")
    data = json.load(open(cfg.qa))
    with tempfile.TemporaryDirectory() as tmp:
        for pmid, rec in data.items():
            with open(os.path.join(tmp, f'{pmid}.txt'), 'w') as f:
                f.write(' '.join(rec['CONTEXTS']))
        items = [{'question': rec['QUESTION'], 'source': f'{pmid}.txt'} for pmid, rec in data.items()]
        idx = rag.Index(rag.RagConfig())
        t0 = time.perf_counter()
        idx.update(tmp, log=lambda *a: None)
        idx.postings()
        t_ours_all = time.perf_counter() - t0
        print(f"bench rag: PubMedQA-L, {len(data)} abstracts -> {len(idx.chunks)} chunks, {len(items)} questions; "
              f"best of {cfg.rounds}; indexing from files (read, chunk, count): {t_ours_all:.2f}s")
        if cfg.embed_from:  # dense vectors: optionally tuned on these chunks first (no labels: rag.py tune)
            embed_from = cfg.embed_from
            if cfg.tune_steps:
                t0 = time.perf_counter()
                rag.tune(idx, rag.RagConfig(embed_from=cfg.embed_from, out_dir=os.path.join(tmp, 'tuned'),
                                            tune_steps=cfg.tune_steps), log=lambda *a: None)
                embed_from = os.path.join(tmp, 'tuned')
                print(f"rag.py tune of {cfg.embed_from}: {cfg.tune_steps} steps in {time.perf_counter() - t0:.1f}s")
            idx.settings.update(embed_from=embed_from, pooling='auto')
            t0 = time.perf_counter()
            idx.dense = idx.embed([c['text'] for c in idx.chunks])
            print(f"dense vectors ({idx.settings['pooling']} pooling) of every chunk: {time.perf_counter() - t0:.1f}s")
    chunks = [rag.terms(c['text']) for c in idx.chunks]
    queries = [rag.terms(it['question']) for it in items]

    def best(fn):
        times = []
        for _ in range(cfg.rounds):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    def ours_build():
        i = rag.Index(rag.RagConfig())
        i.chunks = [{'length': len(c)} for c in chunks]
        for c in chunks:
            ids = np.array([i.vocab.setdefault(w, len(i.vocab)) for w in c], dtype=np.int64)
            u, tf = np.unique(ids, return_counts=True)
            i.chunk_terms.append(u)
            i.chunk_tfs.append(tf)
        i.postings()
        return i
    rows = {}
    t_build, _ = best(ours_build)
    t_query, _ = best(lambda: idx.search([it['question'] for it in items], 10, 'bm25'))
    rows['ours'] = (t_build, len(items) / t_query)
    try:
        import rank_bm25
        t_build, ref = best(lambda: rank_bm25.BM25Okapi(chunks))
        t_query, _ = best(lambda: [np.argsort(-ref.get_scores(q))[:10] for q in queries])
        rows['rank_bm25'] = (t_build, len(items) / t_query)
    except ImportError:
        print("rank_bm25 is not installed (pip install -r requirements-dev.txt): its row is left out")
    try:
        import bm25s

        def bm25s_build():
            r = bm25s.BM25()
            r.index(chunks, show_progress=False)
            return r
        t_build, r = best(bm25s_build)
        t_query, _ = best(lambda: r.retrieve(queries, k=10, show_progress=False))
        rows['bm25s'] = (t_build, len(items) / t_query)
    except ImportError:
        print("bm25s is not installed (pip install -r requirements-dev.txt): its row is left out")
    print(f"{'BM25':<10} {'build s':>8} {'queries/s':>10}")
    for name, (b, q) in rows.items():
        print(f"{name:<10} {b:8.3f} {q:10,.0f}")
    if 'rank_bm25' in rows:
        x = rows['ours'][1] / rows['rank_bm25'][1]
        print(f"target query throughput >= 10x rank_bm25: {x:.0f}x {'met' if x >= 10 else 'MISSED'}")
    quality = {}
    for retriever in (['bm25', 'dense', 'hybrid'] if idx.dense is not None else ['bm25']):
        quality[retriever] = rag.evaluate(idx, items, retriever, dense_weight=cfg.dense_weight)
        q = quality[retriever]
        print(f"{retriever:<7} recall@1 {q['recall@1']:.3f}  recall@5 {q['recall@5']:.3f}  recall@10 "
              f"{q['recall@10']:.3f}  MRR {q['mrr']:.3f}")
    if 'hybrid' in quality:
        h, other = quality['hybrid']['recall@5'], max(quality['bm25']['recall@5'], quality['dense']['recall@5'])
        print(f"target hybrid recall@5 >= the better of BM25 and dense: {h:.3f} vs {other:.3f} "
              f"{'met' if h >= other else 'MISSED'}")
    return rows, quality


@dataclass
class ServeBenchConfig:
    # the model: SHAPES['gpt2-124m'] (any field of ModelConfig overridable), random weights, GPT-2's tokenizer
    new_tokens: int = 64         # per request; greedy would stop nowhere on random weights either way
    clients: str = '1,4,8'
    rounds: int = 2              # the best of rounds counts
    port: int = 8765


def stream_request(url, prompt, max_tokens):
    """(seconds to the first text, seconds in all, completion tokens) of one streamed chat request."""
    import urllib.request
    body = json.dumps({'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': max_tokens, 'stream': True,
                       'temperature': 0.8, 'stream_options': {'include_usage': True}}).encode()
    t0, first, tokens = time.perf_counter(), None, 0
    req = urllib.request.Request(url + '/v1/chat/completions', data=body, headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b'data: {'):
                chunk = json.loads(line[6:])
                if first is None and chunk['choices'] and chunk['choices'][0]['delta'].get('content'):
                    first = time.perf_counter() - t0
                if chunk.get('usage'):
                    tokens = chunk['usage']['completion_tokens']
    return first or float('nan'), time.perf_counter() - t0, tokens


def bench_serve(argv):
    """Time to first token and tokens/s of chat_ui.py for 1, 4 and 8 concurrent streaming clients, against the
    same model decoding the same number of tokens through sample.py's path (load_model, packed, generate)."""
    import threading
    import urllib.request
    from train import load_model
    cfg, mcfg, _ = parse_bench(ServeBenchConfig, argv, 'gpt2-124m')
    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    torch.save({'model': build_model(mcfg).state_dict(), 'model_args': asdict(mcfg),
                'meta': {'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'}}}, os.path.join(tmp, 'ckpt.pt'))
    prompt = 'Tell me about the history of the printing press in Europe.'
    model, tok = load_model(tmp)
    pack_linears(model)
    ids = tok.encode('User: ' + prompt + '\nAssistant:')
    direct = 0.0
    for _ in range(cfg.rounds):  # the whole request: prefill and new tokens, as a client sees it
        t0 = time.perf_counter()
        n = sum(1 for _ in model.generate_stream([ids], cfg.new_tokens, temperature=0.8, eos_id=None))
        direct = max(direct, n / (time.perf_counter() - t0))
    del model
    env = {**os.environ, 'CHAT_UI_QUIET': '1'}
    server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat_ui.py'),
                               f'--init_from={tmp}', f'--port={cfg.port}', f'--max_tokens={cfg.new_tokens}'], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f'http://127.0.0.1:{cfg.port}'
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + '/health', timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"error: chat_ui.py did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        stream_request(url, 'warm up', 4)
        print(f"bench serve: GPT-2 124M shape ({mcfg.n_layer}L {mcfg.n_embd}C), {cfg.new_tokens} new tokens per "
              f"request, sampling; sample.py's path alone: {direct:.1f} tokens/s (prefill included)")
        print(f"{'clients':>7} {'TTFT s':>8} {'tok/s per client':>17} {'total tok/s':>12}")
        rows = {}
        for c in [int(x) for x in cfg.clients.split(',')]:
            best = None
            for _ in range(cfg.rounds):
                out = [None] * c
                threads = [threading.Thread(target=lambda i: out.__setitem__(i, stream_request(url, prompt, cfg.new_tokens)),
                                            args=(i,)) for i in range(c)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                r = dict(ttft=statistics.mean(o[0] for o in out),
                         per_client=statistics.mean(o[2] / o[1] for o in out),
                         total=sum(o[2] for o in out) / wall)
                best = r if best is None or r['total'] > best['total'] else best
            rows[c] = best
            print(f"{c:>7} {best['ttft']:8.3f} {best['per_client']:17.1f} {best['total']:12.1f}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if 1 in rows:
        x = rows[1]['total'] / direct
        print(f"target 1 client >= 90% of sample.py's tokens/s: {x:.0%} {'met' if x >= 0.9 else 'MISSED'}")
    if 1 in rows and 8 in rows:
        x = rows[8]['total'] / rows[1]['total']
        print(f"target 8 clients >= 2x the single-client total tokens/s: {x:.2f}x {'met' if x >= 2 else 'MISSED'}")
    return direct, rows


# ----------------------------------------------------------------------------------------------------------
# gguf: a llama.cpp file run by us (fp32, bf16, int8, int4) and by transformers (fp32) on the same weights

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data')


@dataclass
class GGUFBenchConfig:
    gguf: str = os.path.join(SHARED_DATA, 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    text: str = os.path.join(SHARED_DATA, 'wikitext2', 'wiki.valid.tokens')
    variants: str = 'fp32,bf16,int8,int4'  # ours; transformers runs in fp32
    hf_from: str = 'gguf'        # transformers' weights: 'gguf' (its own GGUF reader) | 'folder' (our save_pretrained)
    prompt_len: int = 512        # prefill: generate one token from a prompt this long
    decode_prompt: int = 16      # decode: from prompts this long (short, so the prefill left out is small)
    new_tokens: int = 64         # greedy
    batch_sizes: str = '1,8'
    rounds: int = 3              # speed: every variant timed in turn this many times; the best counts
    load_rounds: int = 3         # fresh processes per variant: the best load time, the largest peak memory count
    ppl_tokens: int = 20000      # perplexity on the first this many tokens of text (0 = all)
    ppl_context: int = 1024      # window length
    ppl_stride: int = 512        # windows advance by this (<= ppl_context); each target is scored once
    ppl_batch: int = 8           # windows per forward of ours (transformers' loop runs them one at a time)
    group_size: int = 32         # int4: Q4_1's block, so int4 holds the file's Q4_1 matrices exactly
    quant_embeddings: bool = True  # int8/int4 also quantize the (tied) embedding and head, as quantize.py does
    table_scheme: str = 'int8'   # their scheme ('' = the variant's): 8 bits, as in the file (4 bits: +5.6% ppl)
    quant_dtype: str = 'float32'  # int8/int4: the dtype of everything around the quantized Linears
    report: str = ''             # write the results here as JSON
    num_threads: int = 0


def peak_rss_mib():
    """This process's peak resident memory: VmHWM, as ru_maxrss keeps the parent's peak across fork + exec."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or 'unknown CPU'


def hf_gguf_tokenizer(path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                      gguf_file=os.path.basename(path))


def gguf_tokenizer(g):
    """(whose, encode) of the GGUF's tokenizer: bpe.py's reader of its metadata where it has one, else
    transformers'. encode adds no special tokens."""
    if hasattr(bpe.Tokenizer, 'from_gguf'):
        tok = bpe.Tokenizer.from_gguf(g.metadata)
        return 'bpe.py', getattr(tok, 'encode_ordinary', tok.encode)
    tok = hf_gguf_tokenizer(g.path)
    return 'transformers', lambda text: tok.encode(text, add_special_tokens=False)


def text_tokens(encode, path, n):
    """The first n tokens of a text file (all of them for n = 0), encoding whole lines, no more than it takes."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    chars = 8 * n if n else len(text)
    while True:
        end = text.find('\n', chars)
        end = len(text) if end < 0 else end + 1
        ids = list(encode(text[:end]))
        if not n or len(ids) >= n + 64 or end == len(text):  # the margin: the last line's cut can't reach n
            return ids[:n] if n else ids
        chars *= 2


def state_bytes(model):
    """Bytes of the tensors the model saves (weights, codes, scales), a tied one once: what one decode step
    reads, give or take the embedding rows it does not."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def gguf_variant(model, variant, cfg):
    """(model, weight bytes) of our model as variant runs it, converted in place: fp32 or bf16 weights, or int8 /
    int4 Linears and embedding (quantize.py), then packed for oneDNN as sample.py decodes on CPU."""
    import quantize
    if variant == 'bf16':
        model.to(torch.bfloat16)
    elif variant in ('int8', 'int4'):
        quantize.quantize_model(model, variant, cfg.group_size, embeddings=cfg.quant_embeddings,
                                table_scheme=cfg.table_scheme or None)
        model.to(getattr(torch, cfg.quant_dtype))
    elif variant != 'fp32':
        sys.exit(f"error: variant {variant!r} is not one of fp32, bf16, int8, int4")
    wbytes = state_bytes(model)
    return cpu_pack(model), wbytes


def cpu_pack(model):
    """The Linears packed for oneDNN, as generate does on CPU by default: model.py's pack_linears where it has one
    (generate_stream calls it itself), else sample.py's, whose bf16 kernel needs a CPU with oneDNN bf16."""
    import model as model_py
    if hasattr(model_py, 'pack_linears'):
        return model_py.pack_linears(model)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()) and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return model
    return pack_linears(model)


class StepClock:
    """A transformers streamer that notes when generate hands it tokens: the prompt, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate_fn(model, hf):
    """gen(x, n) -> (the n greedy new tokens (B, n) after prompts x (B, T), seconds from the call to the first new
    token, seconds from the first new token to the last), from ours (generate_stream) or transformers' generate."""
    def ours(x, n):
        t0, times, steps = time.perf_counter(), [], []
        for step in model.generate_stream(x, n, temperature=0):
            times.append(time.perf_counter())
            steps.append(step)
        return torch.tensor(steps).T, times[0] - t0, times[-1] - times[0]

    def theirs(x, n):
        clock, t0 = StepClock(), time.perf_counter()
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0, streamer=clock)
        return y[:, x.size(1):], clock.times[1] - t0, clock.times[-1] - clock.times[1]
    return theirs if hf else ours


def gguf_prompts(ids, B, T):
    return torch.tensor(ids[:B * T], dtype=torch.long).view(B, T)  # consecutive pieces of the text


def gguf_worker(cfg, variant, folder):
    """One variant in this fresh process: load it (ours: read_gguf, model_from_gguf, tokenizer, then convert and
    pack; transformers: from the GGUF or from folder), prefill, decode at the largest batch; one JSON line."""
    import weights
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    hf = variant.startswith('hf')
    if hf or not hasattr(bpe.Tokenizer, 'from_gguf'):
        import transformers  # imports do not count as load time
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if hf:
        src, kw = ((folder, {}) if variant == 'hf-folder' else
                   (os.path.dirname(os.path.abspath(cfg.gguf)), {'gguf_file': os.path.basename(cfg.gguf)}))
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
        t1 = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(src, **kw)
        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        t2 = t3 = time.perf_counter()
    else:
        g = weights.read_gguf(cfg.gguf)
        model = weights.model_from_gguf(g)
        t1 = time.perf_counter()
        _, encode = gguf_tokenizer(g)
        t2 = time.perf_counter()
        model, _ = gguf_variant(model, variant, cfg)
        t3 = time.perf_counter()
    B = max(map(int, cfg.batch_sizes.split(',')))
    ids = text_tokens(encode, cfg.text, max(cfg.prompt_len, B * cfg.decode_prompt))
    gen = generate_fn(model, hf)
    with torch.no_grad():
        gen(gguf_prompts(ids, 1, cfg.prompt_len), 1)
        y = gen(gguf_prompts(ids, B, cfg.decode_prompt), cfg.new_tokens)[0]
    print(json.dumps(dict(model_s=t1 - t0, tokenizer_s=t2 - t1, load_s=t2 - t0, ready_s=t3 - t0,
                          peak_mib=peak_rss_mib(), tokens=y[0].tolist())))


def gguf_speed(gens, ids, cfg, sizes):
    """Prefill tokens/s (prompt_len tokens over the time to the first new token) and decode tokens/s per batch size
    (from decode_prompt prompts: the new tokens after the first over the time from the first to the last) of each
    gen, timed in turn round after round, the best of each; and the new tokens of each batch."""
    T, n = cfg.prompt_len, cfg.new_tokens
    xs = {B: gguf_prompts(ids, B, cfg.decode_prompt) for B in sizes} | {'prefill': gguf_prompts(ids, 1, T)}
    with torch.no_grad():
        for gen in gens.values():  # warm-up: allocator, kernel choices, the first call's packing
            for x in xs.values():
                gen(x, 2)
        best, out = {}, {}
        for _ in range(cfg.rounds):
            for v, gen in gens.items():
                for B, x in xs.items():
                    y, first, rest = gen(x, 1 if B == 'prefill' else n)
                    best[v, B] = min(best.get((v, B), float('inf')), first if B == 'prefill' else rest)
                    out[v, B] = y
    rows = {v: {'prefill_tps': T / best[v, 'prefill']} | {f'decode_b{B}_tps': B * (n - 1) / best[v, B] for B in sizes}
            for v in gens}
    return rows, out


def eval_context(model, ids, cfg):
    """train.eval_tokens over windows of ppl_context tokens (it takes the window from config.block_size)."""
    from train import eval_tokens
    block = model.config.block_size
    model.config.block_size = cfg.ppl_context
    try:
        return eval_tokens(model, ids, cfg.ppl_stride, cfg.ppl_batch)
    finally:
        model.config.block_size = block


@torch.no_grad()
def hf_perplexity(model, ids, context, stride):
    """transformers' model on the windows eval_tokens reads, one at a time: inputs ids[start:start + context]
    (ending at the last input), start advancing by stride, and only the targets no earlier window scored count."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    nll, count, done, start = 0.0, 0, 0, 0
    while done < len(ids) - 1:
        end = min(start + context, len(ids) - 1)
        logits = model(input_ids=ids[None, start:end]).logits[0].float()  # (end - start, V): predicts start+1..end
        nll += torch.nn.functional.cross_entropy(logits[done - start:], ids[done + 1:end + 1], reduction='sum').item()
        count += end - done
        done, start = end, start + stride
    return {'loss': nll / count, 'ppl': math.exp(nll / count), 'tokens': count}


def ratio(a, b):
    # a tiny model can grow no memory at all: no ratio then, rather than a ZeroDivisionError
    return f"{a / b:.2f}x" if b else 'n/a'


def markdown_table(header, rows):
    rule = '|' + '|'.join('---:' if i else ':---' for i in range(len(header))) + '|'
    lines = ['| ' + ' | '.join(header) + ' |', rule]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def bench_gguf(argv):
    import transformers
    import weights
    cfg = parse_config(GGUFBenchConfig, argv)
    variants, sizes = cfg.variants.split(','), [int(b) for b in cfg.batch_sizes.split(',')]
    for path in (cfg.gguf, cfg.text):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (bench.py gguf reads ../shared/data; or set --gguf / --text)")
    if set(variants) - {'fp32', 'bf16', 'int8', 'int4'} or cfg.hf_from not in ('gguf', 'folder'):
        sys.exit("error: --variants is a list of fp32, bf16, int8, int4 and --hf_from is gguf or folder")
    if not 0 < cfg.ppl_stride <= cfg.ppl_context or cfg.new_tokens < 2:
        sys.exit("error: --ppl_stride must be in 1..ppl_context, and --new_tokens at least 2 (decode leaves the "
                 "first new token, which the prefill makes, out)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    peak = {d: matmul_flops(getattr(torch, d), 'cpu', n=1024, reps=3) for d in ('float32', 'bfloat16')}
    read_bw, _ = memory_bandwidth()
    cpu = cpu_name()
    print(f"bench gguf: {os.path.basename(cfg.gguf)} on {cpu}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print(f"measured matmul peak (1024^3): float32 {peak['float32'] / 1e9:,.0f} GFLOP/s, bfloat16 "
          f"{peak['bfloat16'] / 1e9:,.1f} GFLOP/s ({peak['bfloat16'] / peak['float32']:.2f}x; bf16 matrix "
          f"instructions: {'yes' if cpu_has_fast_bf16() else 'no'}); memory read bandwidth {read_bw / 1e9:.1f} GB/s",
          flush=True)
    g = weights.read_gguf(cfg.gguf)
    base = weights.model_from_gguf(g)
    whose, encode = gguf_tokenizer(g)
    hf_tok = hf_gguf_tokenizer(cfg.gguf)
    need = max(cfg.ppl_tokens, cfg.prompt_len, max(sizes) * cfg.decode_prompt) if cfg.ppl_tokens else 0
    ids = text_tokens(encode, cfg.text, need)
    same_ids = whose == 'transformers' or \
        text_tokens(lambda t: hf_tok.encode(t, add_special_tokens=False), cfg.text, need) == ids
    if len(ids) < max(cfg.prompt_len, max(sizes) * cfg.decode_prompt):
        sys.exit(f"error: {cfg.text} has {len(ids)} tokens, fewer than prompt_len or batch x decode_prompt")
    ppl_ids = ids[:cfg.ppl_tokens] if cfg.ppl_tokens else ids
    print(f"{num_params(base) / 1e6:.1f}M parameters; tokenizer: {whose}'s reader of the GGUF"
          + ('' if whose == 'transformers' else f" (same ids as transformers': {'yes' if same_ids else 'NO'})"))
    work = tempfile.mkdtemp(prefix='bench_gguf_')
    try:
        weights.save_pretrained(base, work)  # transformers' folder of the same weights, through our exporter
        hf_tok.save_pretrained(work)
        procs = variants + ['hf-gguf', 'hf-folder']
        args = [f'--{k}={v}' for k, v in asdict(cfg).items()]
        fresh = {p: [] for p in procs}
        for _ in range(cfg.load_rounds):  # in turn, so a slow spell hits every variant alike
            for p in procs:
                r = subprocess.run([sys.executable, os.path.abspath(__file__), '_gguf_worker', p, work, *args],
                                   capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f'error: the {p} worker failed:\n{r.stderr[-2000:]}')
                fresh[p].append(json.loads(r.stdout.strip().splitlines()[-1]))
        loads = {p: {**{k: min(r[k] for r in runs) for k in ('model_s', 'tokenizer_s', 'load_s', 'ready_s')},
                     'peak_mib': max(r['peak_mib'] for r in runs), 'tokens': runs[0]['tokens']}
                 for p, runs in fresh.items()}
        ref = loads[variants[0]]['tokens'] if 'fp32' not in loads else loads['fp32']['tokens']
        print(f"\nload, fresh processes, best of {cfg.load_rounds} (seconds after imports; ready = converted and "
              f"packed too; peak = the process's peak RSS through load, a {cfg.prompt_len}-token prefill and a "
              f"batch-{max(sizes)} decode of {cfg.new_tokens} tokens)")
        print(f"{'':<10} {'model s':>8} {'tokenizer s':>12} {'load s':>7} {'ready s':>8} {'peak MiB':>9} "
              f"{'greedy tokens = ours fp32':>26}")
        for p, r in loads.items():
            print(f"{p:<10} {r['model_s']:>8.2f} {r['tokenizer_s']:>12.2f} {r['load_s']:>7.2f} {r['ready_s']:>8.2f} "
                  f"{r['peak_mib']:>9,.0f} {'yes' if r['tokens'] == ref else 'no':>26}", flush=True)
        src, kw = ((work, {}) if cfg.hf_from == 'folder' else
                   (os.path.dirname(os.path.abspath(cfg.gguf)), {'gguf_file': os.path.basename(cfg.gguf)}))
        with contextlib.redirect_stderr(io.StringIO()):  # its GGUF reader's progress bar
            hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    x = gguf_prompts(ids, 1, cfg.prompt_len)
    with torch.no_grad():
        a, b = base(x)[0], hf(input_ids=x).logits
    logits_diff = ((a - b).abs().max() / b.abs().max()).item()
    print(f"\nidentical weights: ours fp32 and transformers (from the {cfg.hf_from}) differ by at most "
          f"{logits_diff:.1e} of the largest logit on a {cfg.prompt_len}-token prompt")
    models, rows = {}, {}
    for v in variants:
        models[v], wbytes = gguf_variant(copy.deepcopy(base), v, cfg)
        rows[v] = {'weight_bytes': wbytes}
    del base
    rows['hf'] = {'weight_bytes': state_bytes(hf)}
    gens = {v: generate_fn(m, False) for v, m in models.items()} | {'hf': generate_fn(hf, True)}
    print(f"speed: prefill of {cfg.prompt_len} tokens; greedy decode of {cfg.new_tokens} from {cfg.decode_prompt}-"
          f"token prompts at batch {cfg.batch_sizes} (the first new token left out); every variant in turn, best of "
          f"{cfg.rounds}", flush=True)
    speed, out = gguf_speed(gens, ids, cfg, sizes)
    for v in rows:
        rows[v].update(speed[v])
        rows[v]['same_tokens_b1'] = (out[v, sizes[0]] == out['hf', sizes[0]]).float().mean().item()
        rows[v]['weights_gbs'] = rows[v]['weight_bytes'] * rows[v][f'decode_b{sizes[0]}_tps'] / sizes[0] / 1e9
        fresh_v = loads['hf-' + cfg.hf_from if v == 'hf' else v]
        rows[v].update({k: fresh_v[k] for k in ('load_s', 'ready_s', 'peak_mib')})
    print(f"perplexity: {len(ppl_ids):,} tokens of {os.path.basename(cfg.text)}, windows of {cfg.ppl_context} "
          f"advancing by {cfg.ppl_stride}", flush=True)
    for v in rows:
        t0 = time.perf_counter()
        r = hf_perplexity(hf, ppl_ids, cfg.ppl_context, cfg.ppl_stride) if v == 'hf' else \
            eval_context(models[v], ppl_ids, cfg)
        rows[v].update(ppl=r['ppl'], ppl_tokens_scored=r['tokens'])
        print(f"  {v:<5} ppl {r['ppl']:.4f} over {r['tokens']:,} scored tokens ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    names = {v: f'ours {v}' for v in variants} | {'hf': 'transformers fp32'}
    b0 = sizes[0]
    header = ['variant', 'load s', 'ready s', 'peak RSS MiB', 'prefill tok/s'] + \
        [f'decode b{B} tok/s' for B in sizes] + ['weights MB', f'GB/s (b{b0})', 'of read bw', 'ppl',
                                                 f'same tokens as hf (b{b0})']
    table = []
    for v, r in rows.items():
        table.append([names[v], f"{r['load_s']:.2f}", f"{r['ready_s']:.2f}", f"{r['peak_mib']:,.0f}",
                      f"{r['prefill_tps']:,.0f}"] + [f"{r[f'decode_b{B}_tps']:,.1f}" for B in sizes] +
                     [f"{r['weight_bytes'] / 1e6:.0f}", f"{r['weights_gbs']:.1f}",
                      f"{r['weights_gbs'] * 1e9 / read_bw:.0%}", f"{r['ppl']:.4f}", f"{r['same_tokens_b1']:.0%}"])
    print('\n' + markdown_table(header, table))
    keys = ['prefill_tps'] + [f'decode_b{B}_tps' for B in sizes]
    labels = ['prefill'] + [f'decode b{B}' for B in sizes]
    refs = [('hf', 'x transformers fp32')] + ([('bf16', 'x our bf16')] if 'bf16' in rows else [])
    header = ['variant'] + [f'{k} {label}' for _, label in refs for k in labels] + ['peak RSS x transformers']
    table = [[names[v]] + [f'{r[k] / rows[ref][k]:.2f}x' for ref, _ in refs for k in keys] +
             [f"{r['peak_mib'] / rows['hf']['peak_mib']:.2f}x"] for v, r in rows.items()]
    print('\n' + markdown_table(header, table))
    print(f"\ntransformers' own loads: the GGUF {loads['hf-gguf']['load_s']:.2f}s, the saved HF folder "
          f"{loads['hf-folder']['load_s']:.2f}s (model and tokenizer)")
    targets = []
    if 'fp32' in rows:
        targets.append(("ours load (GGUF to model and tokenizer) <= 3 s", loads['fp32']['load_s'], 3, 's', False))
        d = abs(rows['fp32']['ppl'] / rows['hf']['ppl'] - 1)
        targets.append(("perplexity ours fp32 = transformers' within 0.1%", d, 0.001, '', False))
    if 'bf16' in rows and 1 in sizes:
        targets.append(("bf16 decode batch 1 >= 2x transformers' fp32",
                        rows['bf16']['decode_b1_tps'] / rows['hf']['decode_b1_tps'], 2, 'x', True))
    if 'bf16' in rows and 'int4' in rows and 1 in sizes:
        targets.append(("int4 decode batch 1 >= 1.5x our bf16",
                        rows['int4']['decode_b1_tps'] / rows['bf16']['decode_b1_tps'], 1.5, 'x', True))
    for what, value, limit, unit, at_least in targets:
        met = value >= limit if at_least else value <= limit
        shown = f"{value:.3%}" if unit == '' else f"{value:.2f}{unit}"
        print(f"target {what}: {shown} {'met' if met else 'MISSED'}")
    result = dict(config=asdict(cfg), cpu=cpu, threads=torch.get_num_threads(), matmul_peak_flops=peak,
                  read_bandwidth=read_bw, tokenizer=whose, same_ids_as_transformers=same_ids,
                  logits_max_rel_diff=logits_diff, loads={p: {k: v for k, v in r.items() if k != 'tokens'}
                                                          for p, r in loads.items()},
                  rows=rows, targets={t[0]: dict(value=t[1], limit=t[2]) for t in targets})
    if cfg.report:
        with open(cfg.report, 'w') as f:
            json.dump(result, f, indent=1)
        print(f"wrote {cfg.report}")
    return result


# ----------------------------------------------------------------------------------------------------------
# eval: eval.py against lm-evaluation-harness on the same items (tests/test_eval_lmeval.py uses these too)

def lmeval_yaml(subjects):
    return {'hellaswag': 'hellaswag/hellaswag.yaml', 'arc_easy': 'arc/arc_easy.yaml', 'piqa': 'piqa/piqa.yaml',
            'winogrande': 'winogrande/default.yaml', 'wikitext': 'wikitext/wikitext.yaml',
            'openbookqa': 'openbookqa/openbookqa.yaml', 'commonsense_qa': 'commonsense_qa/default.yaml',
            'boolq': 'super_glue/boolq/default.yaml', 'lambada_openai': 'lambada/lambada_openai.yaml',
            **{f'mmlu_{s}': f'mmlu/default/mmlu_{s}.yaml' for s in subjects}}


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    return str(path)


def head_jsonl(path, n):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def lmeval_data(root, n, subjects, pages, shared, mmlu_n=None):
    """The first n items of the shared files (per MMLU subject; pages WikiText articles): root/pub in the
    published formats (eval.py's --data_dir layout), root/hf in the Hugging Face datasets' fields, and root/yaml
    the lm-eval task configs that include the stock ones and read root/hf. Returns those paths and the pages."""
    import csv
    import pathlib
    import eval as ev
    import lm_eval
    N, SUBJECTS, PAGES, root = n, subjects, pages, pathlib.Path(root)
    MMLU_N = mmlu_n or n
    shared_file = lambda *parts: os.path.join(shared, *parts)  # noqa: E731
    STOCK = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks')
    STOCK_YAML = lmeval_yaml(subjects)
    pub, hf, hf_records = root / 'pub', root / 'hf', {}

    lines = open(shared_file('eval', 'hellaswag', 'hellaswag_val.head500.txt'), encoding='utf-8').read().splitlines()
    recs = []
    for i in range(0, 6 * N, 6):  # llama.cpp's 6-line items back into HellaSwag's fields
        label, ctx = lines[i].split(': ', 1)
        cut = ctx.rfind('. ')  # ctx_b: the last sentence's start, which lm-eval capitalises
        recs.append({'activity_label': label, 'ctx_a': ctx[:cut + 1] if cut >= 0 else ctx,
                     'ctx_b': ctx[cut + 2:] if cut >= 0 else '', 'endings': lines[i + 2:i + 6],
                     'label': int(lines[i + 1])})
    write_jsonl(pub / 'hellaswag' / 'hellaswag_val.jsonl', recs)
    hf_records['hellaswag'] = [{**r, 'label': str(r['label'])} for r in recs]

    recs = head_jsonl(shared_file('eval', 'arc_easy', 'ARC-Easy-Dev.jsonl'), N)
    write_jsonl(pub / 'arc_easy' / 'ARC-Easy-Dev.jsonl', recs)
    hf_records['arc_easy'] = [{'id': r.get('id', str(i)), 'question': r['question']['stem'],
                               'choices': {'text': [c['text'] for c in r['question']['choices']],
                                           'label': [c['label'] for c in r['question']['choices']]},
                               'answerKey': r['answerKey']} for i, r in enumerate(recs)]

    recs = head_jsonl(shared_file('eval', 'piqa', 'valid.head300.jsonl'), N)
    labels = open(shared_file('eval', 'piqa', 'valid-labels.head300.lst')).read().split()[:N]
    write_jsonl(pub / 'piqa' / 'valid.jsonl', recs)
    (pub / 'piqa' / 'valid-labels.lst').write_text(''.join(f'{l}\n' for l in labels))
    hf_records['piqa'] = [{'goal': r['goal'], 'sol1': r['sol1'], 'sol2': r['sol2'], 'label': int(l)}
                          for r, l in zip(recs, labels)]

    recs = head_jsonl(shared_file('eval', 'winogrande', 'dev.head300.jsonl'), N)
    write_jsonl(pub / 'winogrande' / 'dev.jsonl', recs)
    hf_records['winogrande'] = [{k: str(r[k]) for k in ('sentence', 'option1', 'option2', 'answer')} for r in recs]

    recs = head_jsonl(shared_file('eval', 'openbookqa', 'test.head100.jsonl'), N)  # AI2's jsonl, as ARC's
    write_jsonl(pub / 'openbookqa' / 'test.jsonl', recs)
    hf_records['openbookqa'] = [{'id': r['id'], 'question_stem': r['question']['stem'],
                                 'choices': {'text': [c['text'] for c in r['question']['choices']],
                                             'label': [c['label'] for c in r['question']['choices']]},
                                 'answerKey': r['answerKey']} for r in recs]

    recs = head_jsonl(shared_file('eval', 'commonsenseqa', 'dev_rand_split.head300.jsonl'), N)
    write_jsonl(pub / 'commonsenseqa' / 'dev_rand_split.jsonl', recs)
    hf_records['commonsense_qa'] = [{'id': r['id'], 'question': r['question']['stem'],
                                     'question_concept': r['question'].get('question_concept', ''),
                                     'choices': {'label': [c['label'] for c in r['question']['choices']],
                                                 'text': [c['text'] for c in r['question']['choices']]},
                                     'answerKey': r['answerKey']} for r in recs]

    recs = head_jsonl(shared_file('eval', 'boolq', 'val.head300.jsonl'), N)  # label "true"/"false"; HF's 0/1
    write_jsonl(pub / 'boolq' / 'val.jsonl', recs)
    hf_records['boolq'] = [{'question': r['question'], 'passage': r['passage'], 'idx': r.get('idx', i),
                            'label': int(str(r['label']).strip().lower() == 'true')} for i, r in enumerate(recs)]

    recs = head_jsonl(shared_file('eval', 'lambada', 'lambada_test.head500.jsonl'), N)
    write_jsonl(pub / 'lambada' / 'lambada_test.jsonl', recs)
    hf_records['lambada_openai'] = [{'text': r['text']} for r in recs]

    for s in SUBJECTS:
        for split, n in (('dev', None), ('val', MMLU_N)):
            with open(shared_file('eval', 'mmlu', split, f'{s}_{split}.csv'), encoding='utf-8', newline='') as f:
                rows = [r for r in csv.reader(f) if r][:n]
            os.makedirs(pub / 'mmlu' / split, exist_ok=True)
            with open(pub / 'mmlu' / split / f'{s}_{split}.csv', 'w', encoding='utf-8', newline='') as f:
                csv.writer(f).writerows(rows)
            hf_records[f'mmlu_{s}', split] = [{'question': r[0], 'subject': s, 'choices': r[1:5],
                                               'answer': 'ABCD'.index(r[5].strip())} for r in rows]

    text = open(shared_file('wikitext2', 'wiki.valid.tokens'), encoding='utf-8').read()
    pages = ev.wikitext_pages(text)[:PAGES]
    (pub / 'wikitext').mkdir()
    (pub / 'wikitext' / 'wiki.valid.tokens').write_text(''.join(pages), encoding='utf-8')
    hf_records['wikitext'] = [{'page': p} for p in pages]

    for task in STOCK_YAML:  # every split the stock config names reads the file (the few-shot one: MMLU's dev)
        if task.startswith('mmlu'):
            files = {'test': write_jsonl(hf / f'{task}_test.jsonl', hf_records[task, 'val']),
                     'dev': write_jsonl(hf / f'{task}_dev.jsonl', hf_records[task, 'dev'])}
        else:
            path = write_jsonl(hf / f'{task}.jsonl', hf_records[task])
            files = {split: path for split in ('train', 'validation', 'test')}
        cfg = {'include': os.path.join(STOCK, STOCK_YAML[task]), 'dataset_path': 'json', 'dataset_name': None,
               'dataset_kwargs': {'data_files': files, 'cache_dir': str(root / 'hf_cache')}}
        if task.startswith('mmlu'):
            cfg['num_fewshot'] = 5  # the usual MMLU setting (lm-eval --num_fewshot 5), eval.py's default
        os.makedirs(root / 'yaml', exist_ok=True)
        (root / 'yaml' / f'{task}.yaml').write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return {'pub': str(pub), 'yaml': str(root / 'yaml'), 'pages': pages}




@dataclass
class EvalBenchConfig:
    gguf: str = os.path.join(SHARED_DATA, 'models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    shared: str = SHARED_DATA
    limit: int = 100          # items per task (and per MMLU subject: mmlu_items)
    mmlu_subjects: str = 'abstract_algebra,anatomy,college_biology,high_school_us_history,marketing,virology'
    mmlu_items: int = 10      # scored items per MMLU subject (5-shot from its dev file)
    pages: int = 5            # WikiText articles
    batch_size: int = 4       # lm-eval's requests per forward pass; eval.py runs one item's choices together
    report: str = ''


def bench_eval(argv):
    """eval.py and lm-evaluation-harness (transformers backend, HFLM) on the same dequantized weights (the GGUF
    through weights.py, exported with save_pretrained) and the same items of ../shared/data/eval, each task timed
    on its own: the scores side by side, the gap in points, and the wall times."""
    import transformers
    import eval as ev
    import lm_eval
    import train
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from weights import save_pretrained
    cfg = parse_config(EvalBenchConfig, argv)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    peak = {d: matmul_flops(getattr(torch, d), 'cpu', n=1024, reps=3) for d in ('float32', 'bfloat16')}
    print(f"bench eval: {os.path.basename(cfg.gguf)} on {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, lm_eval {lm_eval.__version__}, transformers {transformers.__version__}; matmul "
          f"peak float32 {peak['float32'] / 1e9:,.0f} GFLOP/s, bfloat16 {peak['bfloat16'] / 1e9:,.1f} GFLOP/s",
          flush=True)
    work = tempfile.mkdtemp(prefix='bench_eval_')
    try:
        model, tok = train.load_model(cfg.gguf, "cpu", "float32")
        folder = os.path.join(work, 'hf')
        save_pretrained(model, folder)
        hf_gguf_tokenizer(cfg.gguf).save_pretrained(folder)
        subjects = cfg.mmlu_subjects.split(',')
        data = lmeval_data(os.path.join(work, 'data'), cfg.limit, subjects, cfg.pages, cfg.shared, cfg.mmlu_items)
        pack_linears(model)
        ecfg = ev.EvalConfig(data_dir=data['pub'], batch_size=cfg.batch_size)
        manager = TaskManager(include_path=data['yaml'], include_defaults=False)
        lm = HFLM(pretrained=folder, device='cpu', dtype='float32', batch_size=cfg.batch_size,
                  max_length=model.config.block_size)
        rows = []
        for task, names in (('hellaswag', ['hellaswag']), ('arc_easy', ['arc_easy']), ('piqa', ['piqa']),
                            ('winogrande', ['winogrande']), ('mmlu', [f'mmlu_{s_}' for s_ in subjects]),
                            ('wikitext', ['wikitext'])):
            results, errors, _ = ev.evaluate(model, tok, ecfg, [task])
            if errors:
                raise SystemExit(f"error: eval.py {task}: {errors[task]}")
            t0 = time.time()
            theirs = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                             verbosity='ERROR')['results']
            their_s = time.time() - t0
            mine = results[task]
            metrics = ['word_perplexity', 'bits_per_byte'] if task == 'wikitext' else \
                ['acc'] if task in ('winogrande', 'mmlu') else ['acc', 'acc_norm']
            for m in metrics:
                if task == 'mmlu':  # lm-eval's group acc: the mean over all items (micro)
                    n_all = [mine['metrics']['subjects'][s_]['n'] for s_ in subjects]
                    their = sum(theirs[f'mmlu_{s_}'][f'{m},none'] * k for s_, k in zip(subjects, n_all)) / sum(n_all)
                else:
                    their = theirs[task][f'{m},none']
                rows.append(dict(task=task, n=mine['n'], metric=m, ours=mine['metrics'][m]['value'], lm_eval=their,
                                 ours_s=mine['seconds'], lm_eval_s=their_s))
            print(f"{task}: done ({mine['seconds']:.1f}s ours, {their_s:.1f}s lm-eval)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print('\n| task | n | metric | eval.py | lm-eval | gap (points) | eval.py s | lm-eval s | speed-up |')
    print('| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    for r in rows:
        pts = 'perplexity' not in r['metric'] and 'bits' not in r['metric']
        f = (lambda v: f'{100 * v:.2f}') if pts else (lambda v: f'{v:.4f}')
        gap = f"{100 * (r['ours'] - r['lm_eval']):+.2f}" if pts else f"{(r['ours'] / r['lm_eval'] - 1):+.2%} rel"
        print(f"| {r['task']} | {r['n']} | {r['metric']} | {f(r['ours'])} | {f(r['lm_eval'])} | {gap} | "
              f"{r['ours_s']:.1f} | {r['lm_eval_s']:.1f} | {r['lm_eval_s'] / max(r['ours_s'], 1e-9):.1f}x |")
    mc = [r for r in rows if r['task'] not in ('wikitext',)]
    worst = max(abs(r['ours'] - r['lm_eval']) for r in mc) * 100
    hs = next(r for r in rows if r['task'] == 'hellaswag')
    print(f"target: every multiple-choice score within 0.2 points of lm-eval's: worst gap {worst:.2f} "
          f"{'met' if worst <= 0.2 else 'MISSED'}")
    x = hs['lm_eval_s'] / hs['ours_s']
    print(f"target: HellaSwag >= 3x faster than lm-eval at batch size {cfg.batch_size}: {x:.1f}x "
          f"{'met' if x >= 3 else 'MISSED'}")
    if cfg.report:
        with open(cfg.report, 'w') as f:
            json.dump(dict(rows=rows, peak=peak, cpu=cpu_name()), f, indent=1)
    return rows



@dataclass
class DistillBenchConfig:
    student: str = 'out-chat-pretrain'  # the pretrained student (python train.py config/chat/pretrain.py)
    teacher: str = '../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf'
    data: str = '../shared/data/instruct/instruction-data.json'
    out_dir: str = 'bench-distill'      # the teacher's answers are cached here; each variant's run is a folder
    limit: int = 0                      # the first N records (0 = all)
    val_fraction: float = 0.1
    gen_max_tokens: int = 160           # these four as config/chat/distill.py has them, so the teacher's answers
    gen_batch_size: int = 16            # that its run cached (copy out-chat-distill/teacher_answers.jsonl into
    max_iters: int = 150                # out_dir) are read, not generated again; max_iters is the same for every
    batch_size: int = 16                # variant: packed rows, so the same tokens per step
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    eval_iters: int = 10
    seed: int = 1337


def bench_distill(argv):
    """The held-out loss on the teacher's answers (to prompts neither student trained on) of a student fine-tuned
    on the data's own answers (SFT only) and of one fine-tuned on the teacher's answers to the same prompts
    (sequence-level distillation), with the same steps of packed rows, so the same training tokens; with a
    tokenizer shared with the teacher, also logit distillation on top. Each variant is finetune_lora.py's
    command line in a fresh process."""
    import finetune_lora
    import train
    cfg = parse_config(DistillBenchConfig, argv)
    fcfg = finetune_lora.FinetuneConfig(gen_max_tokens=cfg.gen_max_tokens, gen_batch_size=cfg.gen_batch_size,
                                        seed=cfg.seed, teacher=cfg.teacher, data=cfg.data)
    print(f"bench distill: student {cfg.student}, teacher {os.path.basename(cfg.teacher)}, on {cpu_name()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    records = train.read_json_records(cfg.data, '--data')[:cfg.limit or None]
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_val = max(1, int(len(records) * cfg.val_fraction))
    t0 = time.time()
    teacher, t_tok = train.load_model(cfg.teacher)
    answers = finetune_lora.generate_answers(teacher, t_tok, records, os.path.join(cfg.out_dir, 'teacher_answers.jsonl'),
                                             fcfg, f"teacher {cfg.teacher}", cfg.data, True)
    gen_s = time.time() - t0
    student, s_tok = train.load_model(cfg.student)
    del teacher
    ok = [bool(a['finished'] and a['text']) for a in answers]
    sets = {'reference': [records[i] for i in order[n_val:]],
            'teacher': [finetune_lora.with_answer(records[i], answers[i]['text']) for i in order[n_val:] if ok[i]],
            'heldout': [finetune_lora.with_answer(records[i], answers[i]['text']) for i in order[:n_val] if ok[i]]}
    paths = {}
    for name, recs in sets.items():
        paths[name] = os.path.join(cfg.out_dir, f'{name}.json')
        with open(paths[name], 'w') as f:
            json.dump(recs, f)
    common = [f'--init_from={cfg.student}', '--task=sft', '--template=chat', '--mode=full', '--pack=True',
              f"--val_data={paths['heldout']}", f'--max_iters={cfg.max_iters}', f'--batch_size={cfg.batch_size}',
              f'--learning_rate={cfg.learning_rate}', f'--min_lr={cfg.min_lr}', '--warmup_iters=10',
              f'--eval_interval={max(1, cfg.max_iters // 4)}', f'--eval_iters={cfg.eval_iters}', f'--seed={cfg.seed}']
    variants = {'sft only (the data\'s answers)': [f"--data={paths['reference']}"],
                'sequence distillation (the teacher\'s answers)': [f"--data={paths['teacher']}"]}
    if s_tok.identity == t_tok.identity:
        variants['sequence + logit distillation'] = [f"--data={paths['teacher']}", '--task=distill', '--distill=logits',
                                                     f'--teacher={cfg.teacher}']
    rows = []
    for name, extra in variants.items():
        out = os.path.join(cfg.out_dir, f'run{len(rows)}')
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, 'finetune_lora.py', *common, *extra, f'--out_dir={out}'],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if p.returncode:
            sys.exit(f"error: {name}: {p.stderr.strip()[-2000:]}")
        with open(os.path.join(out, 'metrics.jsonl')) as f:
            evals = [r for r in map(json.loads, f) if 'val_loss' in r]
        fc = parse_config(finetune_lora.FinetuneConfig, [*common, *extra])
        fc.block_size = student.config.block_size  # as finetune_lora sets it: the rows it trained on
        train_ex = finetune_lora.sft_data(fc, train.read_json_records(extra[0].partition('=')[2]), s_tok, False)[0]
        tokens = sum(len(r[0]) - 1 for r in train_ex) / len(train_ex) * cfg.batch_size * cfg.max_iters
        rows.append(dict(variant=name, curve=[round(r['val_loss'], 4) for r in evals], val_loss=evals[-1]['val_loss'],
                         tokens=tokens, seconds=time.time() - t0))
        print(f"{name}: held-out loss {evals[-1]['val_loss']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    base = rows[0]['val_loss']
    print(f"\nteacher answers: {sum(ok)} of {len(records)} finished within {cfg.gen_max_tokens} tokens "
          f"({gen_s:.0f}s to generate or read); held-out: {len(sets['heldout'])} prompts no student trained on\n")
    print('| student | held-out loss on the teacher\'s answers | vs SFT only | curve | training tokens | s |')
    print('| --- | ---: | ---: | --- | ---: | ---: |')
    for r in rows:
        print(f"| {r['variant']} | {r['val_loss']:.4f} | {r['val_loss'] / base - 1:+.1%} | "
              f"{' → '.join(f'{v:.3f}' for v in r['curve'])} | {r['tokens']:,.0f} | {r['seconds']:.0f} |")
    best = min(r['val_loss'] for r in rows[1:])
    print(f"target: distilled held-out loss >= 10% below SFT-only's: {1 - best / base:.1%} lower "
          f"{'met' if best <= 0.9 * base else 'MISSED'}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# ablate: which of the speedrun's switches pay off in the quick start's shape, at a fixed wall time each


@dataclass
class AblateConfig:
    config: str = 'config/shakespeare_char.py'  # train.py's config that every variant starts from
    minutes: float = 10.0                 # wall time of each run (train.py --max_minutes); 0: the config's max_iters
    seeds: str = '1337'                   # ',' between seeds: each variant runs once per seed
    # ';' between variants, ',' between the overrides of one; '' is the config as it is (the baseline)
    variants: str = (';optimizer=adamw;qk_norm=True;mlp=relu2;logit_softcap=15;zero_init=True;'
                     'tie_embeddings=False;lr_schedule=wsd')
    common: str = ''                      # overrides for every variant, e.g. 'n_layer=4,eval_iters=10'
    work_dir: str = ''                    # where the runs write (default: a temporary folder, removed after)


def bench_ablate(argv):
    """Each variant trains in a fresh train.py process for --minutes of wall time (max_minutes picks its
    iterations from its own step time, so a slower variant gets fewer), once per seed, one at a time; prints the
    final val loss and bits per byte of each, their mean over seeds, and the change against the first variant."""
    cfg = parse_config(AblateConfig, argv)
    variants = [v.strip() for v in cfg.variants.split(';')]
    seeds = [int(x) for x in cfg.seeds.split(',') if x.strip()]
    common = [f'--{kv.strip()}' for kv in cfg.common.split(',') if kv.strip()]
    for v in variants:  # every override checked now, not after an hour of training
        parse_config(TrainConfig, [cfg.config, *common, *(f'--{kv.strip()}' for kv in v.split(',') if kv.strip())])
    peak = {d: matmul_flops(getattr(torch, d), 'cpu') for d in ('float32', 'bfloat16')}
    print(f"bench ablate: {cfg.config}, {cfg.minutes:g} min per run, seeds {seeds}, on {cpu_name()}, "
          f"{torch.get_num_threads()} threads; matmul peak float32 {peak['float32'] / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s", flush=True)
    work = cfg.work_dir or tempfile.mkdtemp(prefix='ablate-')
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for v in variants:
        runs = []
        for seed in seeds:
            out = os.path.join(work, f"{len(rows)}-{seed}")
            shutil.rmtree(out, ignore_errors=True)
            args = [cfg.config, f'--max_minutes={cfg.minutes}', f'--seed={seed}', f'--out_dir={out}', *common,
                    *(f'--{kv.strip()}' for kv in v.split(',') if kv.strip())]
            t0 = time.time()
            p = subprocess.run([sys.executable, os.path.join(here, 'train.py'), *args], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"error: the run of {v or 'the baseline'} failed:\n{p.stderr[-2000:]}")
            with open(os.path.join(out, 'metrics.jsonl')) as f:
                records = [json.loads(line) for line in f]
            last = [r for r in records if 'val_loss' in r][-1]
            runs.append({'seed': seed, 'val_loss': last['val_loss'], 'val_bpb': last.get('val_bpb', float('nan')),
                         'iters': last['iter'], 'wall_s': time.time() - t0})
            curve = ' '.join(f"{r['iter']}:{r['val_loss']:.3f}" for r in records if 'val_loss' in r)
            print(f"  {v or '(baseline)'} seed {seed}: val loss {last['val_loss']:.4f}, bpb {runs[-1]['val_bpb']:.4f}, "
                  f"{last['iter']} iterations, {runs[-1]['wall_s']:.0f} s; val loss by iteration {curve}", flush=True)
        rows.append((v or '(baseline)', runs))
    if not cfg.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.mean(r['val_loss'] for r in rows[0][1])
    table = []
    for name, runs in rows:
        loss = statistics.mean(r['val_loss'] for r in runs)
        spread = f" ± {statistics.stdev(r['val_loss'] for r in runs):.4f}" if len(runs) > 1 else ''
        table.append([name, f"{loss:.4f}{spread}", f"{statistics.mean(r['val_bpb'] for r in runs):.4f}",
                      f"{loss - base:+.4f}", f"{statistics.mean(r['iters'] for r in runs):.0f}",
                      f"{statistics.mean(r['wall_s'] for r in runs):.0f}"])
    print(markdown_table(['variant', 'val loss', 'val bpb', 'vs first', 'iterations', 'wall s'], table))
    return rows


BENCHES = {'ablate': bench_ablate, 'train': bench_train, 'bpe': bench_bpe, 'decode': bench_decode, 'finetune': bench_finetune,
           'quantize': bench_quantize, 'rag': bench_rag, 'serve': bench_serve, 'gguf': bench_gguf, 'eval': bench_eval,
           'distill': bench_distill}


def main(argv):
    if argv[:1] == ['_train_worker']:
        return train_worker(parse_config(BenchConfig, argv[1:]))
    if argv[:1] == ['_finetune_worker']:
        cfg, mcfg, _ = parse_bench(FinetuneBenchConfig, argv[2:], 'gpt2-124m')  # the shape's overrides come in argv
        return finetune_worker(cfg, mcfg, argv[1])
    if argv[:1] == ['_gguf_worker']:
        return gguf_worker(parse_config(GGUFBenchConfig, argv[3:]), argv[1], argv[2])
    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'tiktoken_cache')
    if os.path.isdir(cache):  # GPT-2's tokenizer offline, from ../shared
        os.environ.setdefault('TIKTOKEN_CACHE_DIR', cache)
    if not argv or argv[0] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [config.py] [--key=value ...]")
    BENCHES[argv[0]](argv[1:])


if __name__ == '__main__':
    run_cli(main)

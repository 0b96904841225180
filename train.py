"""
Train a GPT, LLaMA or BERT from scratch or resume a run, on one CPU, one GPU or many (torchrun).

    python train.py                                   # the defaults below: a small char-level GPT
    python train.py config/shakespeare_char.py --max_iters=2000 --dtype=float32
    python train.py config/shakespeare_char.py --init_from=resume
    torchrun --standalone --nproc_per_node=4 train.py config/gpt2_124m.py

Settings come from the TrainConfig defaults, then config files (Python files of plain assignments), then
--key=value arguments, in that order. Every key and type is checked. The resolved config is saved to
out_dir/config.json and inside every checkpoint.

Batches are a pure function of (seed, iteration, micro-step), dropout is reseeded from (seed, iteration), and
checkpoints hold model, optimizer, scaler and counters, so `--init_from=resume` continues exactly where the
run stopped: the losses after a resume are bit for bit those of an uninterrupted run.

Other scripts import from here: UserError, parse_config, the device/dtype helpers, checkpoint I/O.
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import re
import statistics
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn import functional as F

import bpe
from configurator import (UserError, atomic_write, check_ranges, decode_file, parse_config, print_config, run_cli,
                          tiktoken_encoding, writable_dir)
from model import ModelConfig, build_model, configure_optimizers, flops_per_token, num_params
from quantize import load_quantized
from weights import GGUFError, PretrainedError, from_pretrained, model_from_gguf, pretrained_folder, read_gguf


@dataclass
class LoopConfig:
    """Every key train() reads, and only those: batches, optimisation, evaluation, checkpoints, the system.
    TrainConfig adds what lm_task builds its model and data from, finetune_lora.FinetuneConfig what fine-tuning
    needs, so neither script accepts a key that it would ignore."""
    out_dir: str = 'out'
    trust_checkpoint: bool = False           # load checkpoints that need pickle (it can run code): trusted files only
    # batches
    block_size: int = 256                    # tokens per sequence: the model's context (see TrainConfig)
    batch_size: int = 16                     # sequences per micro-step (per process)
    gradient_accumulation_steps: int = 1     # micro-steps per iteration, over all processes together
    # optimisation: AdamW (or Muon for the blocks' matrices), linear warmup, then decay to min_lr
    max_iters: int = 2000
    max_minutes: float = 0.0                 # a wall-time budget: max_iters (0 = no cap) from the measured step time
    optimizer: str = 'adamw'                 # adamw | muon (the blocks' 2-D weights; AdamW for the rest)
    learning_rate: float = 1e-3              # AdamW's (with muon: embeddings, head, norms, biases)
    min_lr: float = 1e-4
    muon_lr: float = 0.02                    # Muon's peak lr; it follows learning_rate's schedule
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    warmup_iters: int = 100
    lr_schedule: str = 'cosine'              # cosine | wsd (warmup, stable, then linear decay over decay_frac)
    decay_frac: float = 0.2                  # wsd: the fraction of lr_decay_iters spent decaying to min_lr
    lr_decay_iters: int = 0                  # 0 = max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                   # 0 = no clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    patience: int = 0                        # stop after this many evaluations without a new best; 0 = never
    always_save_checkpoint: bool = True      # write ckpt.pt at every evaluation, not only on a new best
    # system
    device: str = 'auto'                     # auto | cpu | cuda | cuda:1 | mps
    dtype: str = 'auto'                      # auto | float32 | bfloat16 | float16
    num_threads: int = 0                     # CPU threads for torch; 0 = torch's default
    compile: bool = False                    # torch.compile the model
    grad_checkpoint: bool = False            # recompute block activations in backward: less memory, ~1/3 more compute
    fsdp: bool = False                       # under torchrun: shard weights, grads and optimizer state (FSDP2)
    peak_tflops: float = 0.0                 # accelerator's bf16 peak for the MFU log; 0 = known GPUs by name
    seed: int = 1337
    dry_run: bool = False                    # build everything, run one step, print sizes, exit


@dataclass
class TrainConfig(LoopConfig):
    """train.py's settings: the loop's, and the data and model that lm_task builds."""
    data_dir: str = 'data/shakespeare_char'  # a folder written by prepare.py
    doc_aligned: bool = False                # every row starts at a document start, rows best-fit packed
    init_from: str = 'scratch'               # scratch | resume (from out_dir/ckpt.pt)
    # model (see model.ModelConfig; block_size is above); vocab_size 0 = the data's vocabulary (+1 [MASK] for bert)
    model_type: str = 'gpt'
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0
    n_embd: int = 384
    intermediate_size: int = 0
    vocab_size: int = 0
    dropout: float = 0.0
    bias: bool = True
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    mlp: str = ''                            # gelu | swiglu | relu2; '' = the family's (swiglu for llama)
    qk_norm: bool = False
    logit_softcap: float = 0.0               # 0 = off; e.g. 15
    zero_init: bool = False                  # output projections (and an untied head) start at zero
    mlm_probability: float = 0.15            # bert: fraction of tokens to predict


MODEL_KEYS = [f.name for f in fields(ModelConfig) if f.name in {g.name for g in fields(TrainConfig)}]

def check_train_config(cfg):
    check_ranges(cfg, positive=('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size',
                                'gradient_accumulation_steps', 'eval_interval', 'eval_iters', 'log_interval',
                                'rope_theta'),
                 non_negative=('learning_rate', 'n_kv_head', 'intermediate_size', 'vocab_size', 'max_iters', 'min_lr', 'warmup_iters',
                               'lr_decay_iters', 'weight_decay', 'grad_clip', 'patience', 'num_threads',
                               'peak_tflops'),
                 fractions=('dropout', 'beta1', 'beta2'))
    if not 0 < cfg.mlm_probability < 1:
        raise UserError(f"mlm_probability must be in (0, 1), not {cfg.mlm_probability!r}")
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr ({cfg.min_lr}) is above learning_rate ({cfg.learning_rate}): the decay would raise it")
    writable_dir(cfg.out_dir, 'out_dir')


def check_loop_config(cfg):
    """The checks of LoopConfig's keys that train() needs whatever the task (train.py's, finetune_lora.py's)."""
    check_ranges(cfg, non_negative=('max_minutes', 'muon_weight_decay'), fractions=('muon_momentum',))
    if cfg.optimizer not in ('adamw', 'muon'):
        raise UserError(f"optimizer must be adamw or muon, not '{cfg.optimizer}'")
    if cfg.lr_schedule not in ('cosine', 'wsd'):
        raise UserError(f"lr_schedule must be cosine or wsd, not '{cfg.lr_schedule}'")
    if not 0 < cfg.decay_frac <= 1:
        raise UserError(f"decay_frac must be in (0, 1], not {cfg.decay_frac!r}")
    if cfg.optimizer == 'muon':
        if cfg.fsdp:
            raise UserError("optimizer=muon needs whole matrices and fsdp=True shards them: use DDP (fsdp=False, "
                            "each process keeps the whole model) or optimizer=adamw")
        if cfg.learning_rate <= 0 or cfg.muon_lr <= 0:
            raise UserError("optimizer=muon needs learning_rate > 0 and muon_lr > 0 (Muon's lr follows "
                            "learning_rate's schedule)")


# ----------------------------------------------------------------------------------------------------------
# devices and precision


def cpu_has_fast_bf16():
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 matmuls beat fp32 by far."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_device(device):
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but this PyTorch sees no CUDA GPU; use --device=cpu")
    if device not in ('cpu', 'mps') and not device.startswith('cuda'):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, not '{device}'")
    return device


def resolve_dtype(dtype, device):
    """'auto' is bfloat16 where the device runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32."""
    if dtype == 'auto':
        if device.startswith('cuda'):
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return 'bfloat16' if device == 'cpu' and cpu_has_fast_bf16() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not '{dtype}'")
    return dtype


def autocast(device, dtype):
    """Mixed precision context: matmuls in dtype, reductions and the loss in float32."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))

# ----------------------------------------------------------------------------------------------------------
# data


def load_data(data_dir):
    """meta dict and {'train', 'val'} token arrays (memory-mapped) from a folder written by prepare.py."""
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        name = os.path.basename(os.path.normpath(data_dir))
        known = ('shakespeare_char', 'shakespeare', 'pydocs')
        cmd = (f"python prepare.py --dataset={name} --out_dir={data_dir}" if name in known else
               f"python prepare.py --dataset=text --input=YOUR_FILES --out_dir={data_dir}")
        raise UserError(f"no prepared data in '{data_dir}' (meta.json missing): run `{cmd}` first")
    with open(meta_path) as f:
        meta = json.load(f)
    tok = meta.get('tokenizer') or {}
    if tok.get('kind') == 'bpe':  # the model file goes into meta, and so into every checkpoint: self-contained
        path = os.path.join(data_dir, tok['file'])
        try:
            with open(path, 'rb') as f:
                raw = f.read()
        except OSError:
            raise UserError(f"'{path}' (the bpe tokenizer) is missing: re-run prepare.py for {data_dir}") from None
        if hashlib.sha256(raw).hexdigest() != tok['sha256']:
            raise UserError(f"'{path}' is not the tokenizer the data was made with: re-run prepare.py for {data_dir}")
        meta['tokenizer'] = {**tok, 'model': raw.decode('utf-8')}
    files = {'train': [s['file'] for s in meta['train_shards']] if 'train_shards' in meta else ['train.bin'],
             'val': ['val.bin']}
    data = {}
    for split, names in files.items():
        data[split] = []
        for name in names:
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise UserError(f"'{path}' is missing or empty: re-run prepare.py for {data_dir}")
            data[split].append(np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r'))
    return meta, data


def sample_windows(shards, rng, n, length):
    """n windows of length tokens at random from a list of token arrays (shards) read as one stream; every
    start position is equally likely and no window crosses a shard boundary. Returns (n, length) int64."""
    starts = np.array([max(0, len(a) - length) for a in shards])  # valid start positions per shard
    cum = np.cumsum(starts)
    u = rng.integers(0, cum[-1], n)
    shard = np.searchsorted(cum, u, side='right')
    offset = u - (cum[shard] - starts[shard])
    return np.stack([shards[s][o:o + length] for s, o in zip(shard, offset)]).astype(np.int64)


def mask_tokens(x, rng, mask_id, vocab_size, mlm_probability):
    """BERT masking: pick mlm_probability of positions; 80% become mask_id, 10% a random token, 10% stay.
    x: (B, T) int64 numpy. Returns inputs and targets (-100 where nothing is predicted)."""
    picked = rng.random(x.shape) < mlm_probability
    targets = np.where(picked, x, -100)
    action = rng.random(x.shape)
    inputs = np.where(picked & (action < 0.8), mask_id, x)
    randomise = picked & (action >= 0.8) & (action < 0.9)
    inputs = np.where(randomise, rng.integers(0, vocab_size, x.shape), inputs)
    return inputs, targets


def batch_rng(seed, split, it, micro):
    """The random generator of one batch, a pure function of (seed, split, iteration, micro-step): every batch a
    run draws can be drawn again, so resume and DDP are exact (train.py's and finetune_lora.py's batches)."""
    return np.random.default_rng([seed, 0 if split == 'train' else 1, it, micro])


def document_index(shards, eot):
    """(shard, start, length) arrays of the documents in token arrays whose documents are separated by eot (prepare.py
    writes eot before every document but a split's first): each document starts at its eot, which reads as BOS.
    A later shard's first tokens, before its first eot, end a document that began in the shard before: left out."""
    found = []
    for s, a in enumerate(shards):
        starts = np.flatnonzero(np.asarray(a) == eot)
        if s == 0:
            starts = np.concatenate(([0], starts[starts > 0]))
        lengths = np.diff(np.append(starts, len(a)))
        found.append(np.stack([np.full(len(starts), s), starts, lengths], axis=1)[lengths >= 2])
    return np.concatenate(found)


def pack_documents(shards, docs, rng, n, length, pool=64):
    """n rows of length tokens, each starting at a document start: best-fit packing (nanochat's dataloader) from a
    pool of random documents, the longest one that fits the room left in a row first; when none fits, the
    shortest is cut to fill the row, which wastes the least. No row starts mid-document, and a document longer
    than a row is only ever seen up to a row's length. Returns (n, length) int64."""
    picks = list(rng.integers(0, len(docs), pool))
    rows = np.empty((n, length), dtype=np.int64)
    for r in range(n):
        filled = 0
        while filled < length:
            room, lens = length - filled, docs[picks, 2]
            fits = np.flatnonzero(lens <= room)
            j = fits[np.argmax(lens[fits])] if len(fits) else int(np.argmin(lens))
            s, start, size = docs[picks[j]]
            take = min(size, room)
            rows[r, filled:filled + take] = shards[s][start:start + take]
            filled += take
            picks[j] = rng.integers(0, len(docs))
    return rows


def get_batch(data, cfg, split, it, micro, device, mask_id=None, docs=None):
    """The batch for (seed, split, iteration, micro-step): a pure function, so resume and DDP are exact.
    Returns x, y of shape (batch_size, block_size) on device. docs: {split: document_index} for rows that
    start at document starts (doc_aligned); None: windows at random positions."""
    rng = batch_rng(cfg.seed, split, it, micro)
    w = pack_documents(data[split], docs[split], rng, cfg.batch_size, cfg.block_size + 1) if docs else \
        sample_windows(data[split], rng, cfg.batch_size, cfg.block_size + 1)
    if cfg.model_type == 'bert':
        x, y = mask_tokens(w[:, :-1], rng, mask_id, mask_id, cfg.mlm_probability)
    else:
        x, y = w[:, :-1], w[:, 1:]  # targets are the next tokens
    x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    if device.startswith('cuda'):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then to min_lr at lr_decay_iters (0 = max_iters): by a cosine, or (wsd:
    warmup-stable-decay) constant until the last decay_frac of the iterations and linear from there. WSD's
    stable phase does not need the run's length, so a run can be stopped or extended before it decays."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == 'wsd':
        start = max(cfg.warmup_iters, decay_iters - round(cfg.decay_frac * decay_iters))
        if it < start:
            return cfg.learning_rate
        return cfg.learning_rate + (it - start) / (decay_iters - start) * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

# ----------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    with atomic_write(path, 'wb') as f:
        torch.save(obj, f)


def load_checkpoint(path, map_location='cpu', trust=False, mmap=False):
    """A torch.save'd file read weights-only: tensors, numbers, strings, lists and dicts, nothing that runs code.
    A pickle (older checkpoints, someone else's file) could run anything while it loads, so one that needs more
    is refused unless trust=True (--trust_checkpoint=True), which says the file comes from someone you trust.
    mmap: map the tensors instead of reading them (to look at a few keys of a large file)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at '{path}': train one with `python train.py ...` or check out_dir"
                        if not os.path.isdir(path) else f"'{path}' is a folder: a checkpoint file is needed here")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = re.search(r'GLOBAL (\S+)', str(e))  # torch names the first class or function the file needs
        if what is None:  # not that refusal: the bytes themselves are wrong
            why = re.search(r'WeightsUnpickler error: \s*(.+)', str(e))
            raise UserError(f"'{path}' is not a readable checkpoint ({why.group(1) if why else first_line(e)})") \
                from None
        if not trust:
            raise UserError(f"'{path}' holds Python objects ({what.group(1)}) that "
                            f"only pickle loads, and pickle can run code hidden in the file: if you trust where "
                            f"it came from, pass --trust_checkpoint=True") from None
        print(f"warning: loading '{path}' with pickle (--trust_checkpoint=True)", file=sys.stderr)
    except Exception as e:
        raise UserError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from None


def first_line(e):
    return (str(e).strip().splitlines() or [''])[0]


def clean_state_dict(state):
    """torch.compile and DDP prefix parameter names; strip the prefixes so any checkpoint loads anywhere."""
    for prefix in ('_orig_mod.', 'module.'):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def model_from_checkpoint(ckpt, device='cpu', where='the checkpoint'):
    """Rebuild the model a checkpoint was trained as and load its weights."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model_args'), dict) or \
            not isinstance(ckpt.get('model'), dict):
        raise UserError(f"{where} is not a model checkpoint (it needs 'model' and 'model_args' dicts)")
    try:
        model = build_model(ModelConfig(**ckpt['model_args']))
    except (TypeError, ValueError) as e:
        raise UserError(f"{where} has unusable model_args ({first_line(e)})") from None
    try:
        missing, unexpected = model.load_state_dict(clean_state_dict(ckpt['model']), strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shapes that do not match, values that are no tensors
        raise UserError(f"{where} does not match its model_args: {' '.join(str(e).split()[:40])}") from None
    if missing or unexpected:
        raise UserError(f"{where} does not match its model_args: {len(missing)} tensors missing (e.g. "
                        f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return model.to(device)


def append_metrics(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def truncate_metrics(path, last_iter):
    """On resume, drop records written after the checkpoint (a crash between checkpoint and log), and a line torn
    by the crash."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, errors='replace') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn while being written
            if isinstance(record, dict) and record.get('iter', 0) <= last_iter:
                keep.append(line if line.endswith('\n') else line + '\n')
    with atomic_write(path) as f:
        f.writelines(keep)

# ----------------------------------------------------------------------------------------------------------
# the one loader: a model and its tokenizer from any source (train.py's ckpt.pt, a quantize.py checkpoint, a
# Hugging Face folder or Hub name, a GGUF file); every tokenizer has encode, decode, eos_id and chat_template

def bpe_from_text(text, where):
    try:
        return bpe.Tokenizer.loads(text, where)
    except bpe.BPEError as e:
        raise UserError(str(e)) from None


@dataclass
class TextTokenizer:
    """The one tokenizer type: load_model gives this for every source (prepare.py's char vocabulary, tiktoken's
    GPT-2, our bpe.py files, a tokenizer.json, a GGUF file). Special tokens written in the text encode as such
    (a prompt typed in full); encode_parts reads text as text, for what a user or a document wrote."""
    encode: Callable[[str], list]
    decode: Callable[[list], str]      # ids past the vocabulary (a padded model's) do not crash
    eos_id: object = None              # an int, a list of ints (chat models end turns with more than one) or None
    meta: dict = field(default_factory=dict)  # what a checkpoint records to rebuild it (meta['tokenizer'])
    identity: str = ''                 # what must match for a prepared dataset to fit a model
    chat_template: str = None
    bpe: object = None                 # the bpe.Tokenizer behind it, if any: chat templates run on it
    bos_id: int = None                 # the id a plain prompt starts with, when the model expects one
    specials: dict = field(default_factory=dict)  # the special tokens' text -> id, which encode reads as one id
    ordinary: Callable = None          # (text, first) -> ids, special tokens' text read as plain text; None: encode

    def encode_parts(self, parts):
        """Ids of parts: a str is plain text (special tokens' text in it becomes ordinary tokens, never a control
        id), an int is an id. As encode would give for the text with the ints written as their special tokens."""
        ids = []
        for n, part in enumerate(parts):
            if isinstance(part, int):
                ids.append(part)
            elif part:  # first: the text starts the input (SentencePiece may put a space there)
                ids += self.ordinary(part, n == 0) if self.ordinary else self.encode(part)
        return ids

    def tolerant(self):
        """This tokenizer, but a character-level one drops the characters its training text lacked instead of
        failing: documents and chat messages hold characters (accents, symbols) a small char model never saw."""
        if self.meta.get('kind') != 'char':
            return self
        known, encode = set(self.meta['chars']), self.encode
        return dataclasses.replace(self, encode=lambda s: encode(''.join(c for c in s if c in known)))


def char_tokenizer(meta_tok):
    chars = meta_tok['chars']
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(s):
        for c in s:
            if c not in stoi:
                raise UserError(f"character {c!r} is not in this dataset's vocabulary of {len(chars)} "
                                f"characters; leave it out of the prompt")
        return [stoi[c] for c in s]

    def decode(ids):  # a model's vocabulary may be padded past the data's: show those ids as U+FFFD
        return ''.join(chars[i] if 0 <= i < len(chars) else '\ufffd' for i in ids)
    return TextTokenizer(encode, decode, meta_tok.get('eos_id'), meta_tok, json.dumps({'chars': chars}),
                         meta_tok.get('chat_template'))


def tiktoken_tokenizer(name):
    enc = tiktoken_encoding(name)
    return TextTokenizer(lambda s: enc.encode(s, allowed_special='all'),
                         lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab], errors='replace'),
                         enc.eot_token, {'kind': 'tiktoken', 'name': name}, json.dumps('tiktoken'),
                         specials={t: enc.encode_single_token(t) for t in enc.special_tokens_set},
                         ordinary=lambda s, first=True: enc.encode_ordinary(s))


def meta_tokenizer(meta):
    """The tokenizer prepare.py recorded in a dataset's or a checkpoint's meta, with its end-of-text id."""
    tok = meta.get('tokenizer') or {}
    if tok.get('kind') == 'char':
        return char_tokenizer(tok)
    if tok.get('kind') == 'tiktoken':
        return tiktoken_tokenizer(tok['name'])
    if tok.get('kind') == 'bpe':  # ours, or one a fine-tuned model kept from a tokenizer.json or GGUF
        if 'model' not in tok:  # train.load_data and prepare_stream put the file's text here
            raise UserError("this meta has a bpe tokenizer but not its model text: read the data folder with "
                            "train.load_data, or sample from a checkpoint written by train.py")
        out = bpe_tokenizer(bpe_from_text(tok['model'], 'the bpe tokenizer in meta'))
        return dataclasses.replace(out, meta=tok, identity=json.dumps(bpe.tokenizer_identity(tok), sort_keys=True),
                                   eos_id=tok.get('eos_id', out.eos_id),
                                   chat_template=tok.get('chat_template', out.chat_template))
    raise UserError(f"meta.json has an unknown tokenizer {tok!r}; re-run prepare.py for this dataset")


def hf_tokenizer(folder, model_type):
    """GPT-2 uses tiktoken's encoding; the others their tokenizer.json (byte-level or SentencePiece-style BPE)."""
    if model_type == 'gpt':
        return tiktoken_tokenizer('gpt2')
    if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
        raise UserError(f"'{folder}' has no tokenizer.json, so its text cannot be encoded")
    try:
        return bpe_tokenizer(bpe.Tokenizer.from_hf(folder))
    except bpe.BPEError as e:
        raise UserError(str(e)) from None


def bpe_tokenizer(tok):
    """The TextTokenizer of a bpe.Tokenizer (ours, or read from a tokenizer.json or a GGUF file)."""
    eos = list(dict.fromkeys(i for i in (tok.eos_token_id, tok.special_tokens.get('<|im_end|>'),
                                         tok.special_tokens.get('<|eot_id|>')) if i is not None))
    encode, ordinary = functools.partial(tok.encode, allowed_special='all'), tok.encode_ordinary
    try:  # tiktoken encodes ~50x faster, and can when the ids follow the merge order (GPT-2, Llama 3, Qwen2)
        enc = tok.to_tiktoken()
        norm = (lambda s: unicodedata.normalize(tok.normalizer, s)) if tok.normalizer else (lambda s: s)
        encode = lambda s: enc.encode(norm(s), allowed_special='all')  # noqa: E731
        ordinary = lambda s, first=True: enc.encode_ordinary(norm(s))  # noqa: E731
    except bpe.BPEError:  # SentencePiece-style (Llama 2, Mistral): bpe.py's own encoder
        pass
    text = tok.dumps()  # what a checkpoint fine-tuned from this model carries (finetune_lora.py)
    meta = {'kind': 'bpe', 'model': text, 'sha256': hashlib.sha256(text.encode()).hexdigest(), 'eos_id': eos,
            'chat_template': tok.chat_template}
    decode = lambda ids: tok.decode([i for i in ids if i in tok.vocab])  # noqa: E731  (a padded vocabulary's)
    # bos_id: the id a plain prompt starts with when the model expects it (add_bos_token); a chat template writes it
    return TextTokenizer(encode, decode, eos, meta, json.dumps(bpe.tokenizer_identity(meta), sort_keys=True),
                         tok.chat_template, tok, tok.bos_token_id if getattr(tok, 'add_bos_token', False) else None,
                         dict(tok.special_tokens), ordinary)


def is_gguf(path):
    """A .gguf path (which must then exist), or any file that starts with GGUF's magic."""
    if path.endswith('.gguf') and not os.path.isfile(path):
        raise UserError(f"no GGUF file at '{path}'")
    with contextlib.suppress(OSError):
        with open(path, 'rb') as f:
            return f.read(4) == b'GGUF'
    return False


def load_model(init_from, device='cpu', dtype='float32', trust=False):
    """(model in eval mode with its weights in dtype, tokenizer) from anything init_from names (see above).
    The tokenizer has encode(str), decode(ids), eos_id (an int, a list or None) and chat_template. trust: load
    a ckpt.pt that needs pickle (train.load_checkpoint)."""
    if os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        path = os.path.join(init_from, 'ckpt.pt')
        ckpt = load_checkpoint(path, map_location=device, trust=trust)
        if isinstance(ckpt, dict) and 'quantization' in ckpt:  # written by quantize.py
            try:
                model = load_quantized(ckpt).to(device)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"'{path}' is a damaged quantized checkpoint ({type(e).__name__}: "
                                f"{' '.join(str(e).split()[:40])})") from None
        else:
            model = model_from_checkpoint(ckpt, device, f"'{path}'")
        if not (ckpt.get('meta') or {}).get('tokenizer'):
            raise UserError(f"the checkpoint in '{init_from}' has no tokenizer metadata (was it a dry run?)")
        tok = meta_tokenizer(ckpt['meta'])
    elif is_gguf(init_from):
        try:
            g = read_gguf(init_from)
            model = model_from_gguf(g).to(device)
            tok = bpe_tokenizer(bpe.Tokenizer.from_gguf(g.metadata, where=init_from))
        except (GGUFError, PretrainedError, bpe.BPEError) as e:
            raise UserError(str(e)) from None
    else:
        if os.path.isdir(init_from) and not os.path.isfile(os.path.join(init_from, 'config.json')):
            raise UserError(f"no checkpoint at '{init_from}': init_from takes a train.py out_dir (with ckpt.pt), "
                            f"a Hugging Face model folder (with config.json), gpt2 .. gpt2-xl, or hf:org/name")
        try:
            folder = pretrained_folder(init_from)
            model = from_pretrained(folder).to(device)
        except PretrainedError as e:
            raise UserError(str(e)) from None
        tok = hf_tokenizer(folder, model.config.model_type)
    return model.to(getattr(torch, dtype)).eval(), tok


# ----------------------------------------------------------------------------------------------------------
# text out of a model: streaming with stop strings, and chat formats

def stream_text(steps, tok, stop=(), row=0):
    """The text of one row of generate_stream as it comes, in pieces. The end-of-text token is not shown, the
    bytes of a character split over tokens wait for the rest, and text that may start a stop string waits
    until it does not; generation's text ends before the stop string."""
    eos = set([tok.eos_id] if isinstance(tok.eos_id, int) else tok.eos_id or [])
    # Linear time: only the ids since the text was last all shown (nothing held back) are decoded again. A stop
    # string cannot start before that point, or its first characters would have been held back. The window is
    # decoded with one token before it, whose own text is cut off, so SentencePiece's leading spaces come out
    # right.
    ids, base, shown, text = [], 0, 0, ''  # text: of ids[base:]; shown: how much of it was yielded
    for step in steps:
        t = step[row]
        if t is None or t in eos:
            break
        ids.append(t)
        text = tok.decode(ids[base - 1:])[len(tok.decode(ids[base - 1:base])):] if base else tok.decode(ids)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            yield text[shown:min(hits)]
            return
        ready = text[:len(text) - text.endswith('\ufffd')]  # an incomplete UTF-8 character shows as U+FFFD
        end = len(ready)
        for s in stop:  # hold back a tail that could grow into a stop string (also across a pending character)
            end = min(end, next((len(ready) - k for k in range(len(s) - 1, 0, -1) if ready.endswith(s[:k])), end))
        if end > shown:
            yield text[shown:end]
            shown = end
        if shown == len(text):  # all shown: the next window starts here
            base, shown, text = len(ids), 0, ''
    if len(text) > shown:
        yield text[shown:]


class ChatFormat:
    """How a model writes a conversation: its own chat template run as Jinja, exactly as transformers'
    apply_chat_template runs it (SmolLM2's adds a default system prompt, Llama 3's a date line), or for a model
    without a template, plain 'User: ...' / 'Assistant: ...' turns. prompt, reply and turns give text;
    encode_prompt and encode_turns give token ids in which only the template's own text writes special tokens:
    a message that holds '<|im_end|>' is encoded as that text, so it cannot end its turn."""
    SENTINEL = '\x00reply\x00'  # an assistant message no one writes, to find where a reply ends in the template
    HOLE = '\U000f7e00{}\U000f7e01'  # message i's content while the template renders (private-use characters)
    HOLES = re.compile('\U000f7e00([0-9]+)\U000f7e01')

    def __init__(self, tok):
        self.tok, specials = tok, getattr(tok, 'specials', None)
        self.special_re = bpe.special_regex(specials) if specials else None
        template, self.bpe = tok.chat_template, getattr(tok, 'bpe', None)
        self.template = template if template and self.bpe is not None else None
        self.name = 'template' if self.template else 'plain'
        self.stop = ['\nUser:']  # what ends a reply beyond the end-of-text ids
        if self.template:  # the text the template puts after a reply: '<|im_end|>' (ChatML), '<|eot_id|>' ...
            _, after = self.reply([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': self.SENTINEL}])
            self.stop = [after.removeprefix(self.SENTINEL).strip()] if after.startswith(self.SENTINEL) else []
            self.stop = [s for s in self.stop if s]

    def render(self, messages, add_generation_prompt):
        try:
            return self.bpe.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except bpe.BPEError as e:
            raise UserError(str(e)) from None

    def prompt(self, messages):
        """The text of a conversation ({'role', 'content'} dicts) that ends where the assistant's reply begins."""
        if self.template:
            return self.render(messages, add_generation_prompt=True)
        turn = lambda m: f"{m['role'].capitalize()}: {m['content']}\n"  # noqa: E731
        return ''.join(map(turn, messages)) + 'Assistant:'

    def reply(self, messages):
        """(prompt, response) of a conversation ending with the assistant's message: the response is its text as
        the template writes it, with the end-of-turn marker, so fine-tuning learns to stop (finetune_lora.py)."""
        prompt = self.prompt(messages[:-1])
        if not self.template:
            return prompt, ' ' + messages[-1]['content'] + '\n'
        full = self.render(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise UserError("the model's chat template writes the conversation before a reply differently from "
                            "its prompt for that reply, so the reply cannot be cut out for training")
        return prompt, full[len(prompt):]


    def turns(self, messages):
        """[(text, is_reply)] of a whole conversation: the text the template writes before each assistant message
        (system and user turns, the assistant's header), then that message as written, its end-of-turn marker
        included; so fine-tuning can learn every reply and nothing else (finetune_lora.py)."""
        out, done = [], ''
        for i, m in enumerate(messages):
            if m['role'] != 'assistant':
                continue
            prompt, reply = self.reply(messages[:i + 1])
            if not prompt.startswith(done):
                raise UserError("the model's chat template writes earlier turns differently once later turns "
                                "follow, so the replies of this conversation cannot be cut out for training")
            out += [(prompt[len(done):], False), (reply, True)]
            done = prompt + reply
        return out

    def encode_prompt(self, messages):
        """The token ids of prompt(messages), special tokens only where the template writes them. When no message
        holds a special token's text these are tok.encode(prompt(messages)), id for id."""
        if not self.template:  # plain turns: no control tokens at all
            return self.tok.encode_parts([self.prompt(messages)])
        return self.encode_span(*self.written(messages, add_generation_prompt=True))

    def encode_turns(self, messages):
        """[(ids, is_reply)] of turns(messages), each turn encoded on its own (as a prompt that ends there is),
        special tokens only where the template writes them (finetune_lora.py)."""
        turns = self.turns(messages)
        if not self.template or not turns:
            return [(self.tok.encode_parts([text]), is_reply) for text, is_reply in turns]
        last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
        text, specials = self.written(messages[:last + 1], add_generation_prompt=False)
        if ''.join(t for t, _ in turns) != text:
            raise UserError("the model's chat template writes a whole conversation differently from its turns, so "
                            "the replies cannot be cut out for training")
        out, pos = [], 0
        for piece, is_reply in turns:
            out.append((self.encode_span(text, specials, pos, pos + len(piece)), is_reply))
            pos += len(piece)
        return out

    def written(self, messages, add_generation_prompt):
        """(text, [(start, end, id)]): the conversation as the template writes it, and the special tokens that
        the template's own text holds, not those in a message's content. To tell the two apart the template runs
        again with each content a placeholder (HOLE): the text between placeholders is the template's."""
        text = self.render(messages, add_generation_prompt)
        if self.special_re is None:
            return text, []
        holed = [{**m, 'content': self.HOLE.format(i)} if isinstance(m.get('content'), str) and m['content'] else m
                 for i, m in enumerate(messages)]
        spans = template_spans(text, self.HOLES.split(self.render(holed, add_generation_prompt)), messages)
        if spans is None:  # the template writes contents in ways of its own (e.g. cuts them at a marker)
            hit = next((h for m in messages if isinstance(m.get('content'), str)
                        for h in self.special_re.findall(m['content'])), None)
            if hit:
                raise UserError(f"a message holds the special token {hit!r}, and this model's chat template rewrites "
                                f"messages, so it could not be kept from acting as one: leave it out of the message")
            spans = [(0, len(text))]  # no content holds special-token text: the template's are all there is
        return text, [(m.start(), m.end(), self.tok.specials[m.group()])
                      for a, b in spans for m in self.special_re.finditer(text, a, b)]

    def encode_span(self, text, specials, start=0, end=None):
        """The ids of text[start:end]: the special tokens in specials (from written) as their ids, the rest as
        plain text."""
        end = len(text) if end is None else end
        parts, pos = [], start
        for a, b, i in specials:
            if start <= a and b <= end:
                parts += [text[pos:a], i]
                pos = b
        return self.tok.encode_parts(parts + [text[pos:end]])


def template_spans(text, parts, messages):
    """[(start, end)] of text that a template wrote itself, from its rendering with placeholders: parts =
    [template text, placeholder's message number, template text, ...]. A placeholder stands for its message's
    content, as written or trimmed (Llama 3's and Gemma's templates trim it). None if text is not so made."""
    spans, pos = [], 0
    for k in range(0, len(parts), 2):
        piece = parts[k]
        if not text.startswith(piece, pos):
            return None
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
        if k + 1 < len(parts):
            n = int(parts[k + 1])
            content = messages[n].get('content') if n < len(messages) else None
            if not isinstance(content, str):
                return None
            after = parts[k + 2]
            fits = [c for c in dict.fromkeys((content, content.strip())) if text.startswith(c + after, pos)]
            if not fits:
                return None
            pos += len(fits[0])
    return spans if pos == len(text) else None


def chat_style(tok):
    """The ChatFormat of a load_model tokenizer."""
    return ChatFormat(tok)


def chat_prompt(messages, style):
    """The text of a conversation that ends where the assistant's reply begins, in style (a ChatFormat)."""
    return style.prompt(messages)


def read_json_records(path, what='the file'):
    """A list of dicts from a JSON array or a JSONL file, with one-line errors that point at the bad line.
    what names the file in errors (e.g. '--data')."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file '{path}' not found: give a JSON or JSONL file")
    text, why = decode_file(path)
    if text is None:
        raise UserError(f"{what} file '{path}' {why}: give a JSON or JSONL file")
    if text.lstrip().startswith('['):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path} must hold JSON objects (one per line, or an array of them), and at least one")
    return records


# ----------------------------------------------------------------------------------------------------------
# evaluation of a model on text: perplexity and next-token accuracy

@torch.no_grad()
def eval_tokens(model, ids, stride=0, batch_size=8):
    """Perplexity and next-token accuracy over a token sequence, read in block_size windows that advance by
    stride: each token is predicted once, and after the first window with at least block_size - stride
    tokens of context (non-overlapping windows, stride = block_size, see less and score worse)."""
    block, device = model.config.block_size, next(model.parameters()).device
    stride = stride or max(1, block // 2)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(ids) < 2:
        raise UserError("evaluation needs at least 2 tokens of text")
    windows, done, start = [], 0, 0  # (first input, end of the inputs, targets before this are scored)
    while done < len(ids) - 1:
        end = min(start + block, len(ids) - 1)
        windows.append((start, end, done))
        done, start = end, start + stride
    loss, correct, count = 0.0, 0, 0
    for length in sorted({e - s for s, e, _ in windows}):  # equal lengths batch together
        group = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(group), batch_size):
            x = torch.stack([ids[s:e] for s, e, _ in group[i:i + batch_size]]).to(device)
            y = torch.stack([torch.where(torch.arange(s + 1, e + 1) > d, ids[s + 1:e + 1], -100)
                             for s, e, d in group[i:i + batch_size]]).to(device)
            logits = model(x)[0].float()
            loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction='sum').item()
            correct += ((logits.argmax(-1) == y) & (y != -100)).sum().item()
            count += (y != -100).sum().item()
    return {'loss': loss / count, 'ppl': math.exp(loss / count), 'acc': correct / count, 'tokens': count}


def eval_data_tokens(cfg, tok):
    """Token ids to evaluate on: a text file through the model's tokenizer, or a split of a prepare.py folder
    (which must have been made with the model's tokenizer)."""
    path = cfg.eval_data
    if os.path.isdir(path):
        meta, data = load_data(path)
        if cfg.eval_split not in data:
            raise UserError(f"eval_split must be train or val, not '{cfg.eval_split}'")
        if meta_tokenizer(meta).identity != tok.identity:
            raise UserError(f"'{path}' was tokenized with {meta['tokenizer'].get('kind')}, not this model's "
                            f"tokenizer: evaluate on a text file instead (--eval_data=FILE.txt)")
        ids = [t for shard in data[cfg.eval_split] for t in shard[:cfg.max_eval_tokens or None].tolist()]
    elif os.path.isfile(path):
        text, why = decode_file(path)
        if text is None:
            raise UserError(f"'{path}' {why}: --eval_data takes a text file or a prepare.py folder")
        ids = tok.encode(text)
    else:
        raise UserError(f"eval_data '{path}' not found: give a text file or a prepare.py folder")
    return ids[:cfg.max_eval_tokens or None]


# ----------------------------------------------------------------------------------------------------------
# evaluation


def token_bytes(meta, vocab_size):
    """(vocab_size,) int64: the UTF-8 bytes each token id stands for, 0 for special tokens and padding ids. With it
    a loss becomes bits per byte, which does not depend on the tokenizer (nanochat's evaluate_bpb). None when the
    data has no tokenizer (a dry run's random tokens)."""
    tok = (meta or {}).get('tokenizer') or {}
    if not tok:
        return None
    out = np.zeros(vocab_size, dtype=np.int64)
    if tok.get('kind') == 'char':
        sizes = [len(c.encode('utf-8')) for c in tok['chars']]
    elif tok.get('kind') == 'tiktoken':
        enc = tiktoken_encoding(tok['name'])
        special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
        sizes = [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    else:
        b = meta_tokenizer(meta).bpe
        special = set(b.special_tokens.values())
        sizes = [0 if i in special or i not in b.vocab else len(b.vocab[i]) for i in range(b.vocab_size)]
    out[:min(len(sizes), vocab_size)] = sizes[:vocab_size]
    return torch.from_numpy(out)


@torch.no_grad()
def evaluate(model, batch, cfg, device, dtype, token_bytes=None):
    """Mean loss, perplexity and token accuracy over eval_iters fixed val batches, batch('val', k, 0) -> (x, y)
    (the same ones every time, so successive evaluations are comparable); with token_bytes (see there) also bits
    per byte: the summed loss of the tokens that are text, in bits, over the bytes of that text."""
    model.eval()
    total_loss, correct, counted, nats, nbytes = 0.0, 0, 0, 0.0, 0
    sizes = None
    for k in range(cfg.eval_iters):
        x, y = batch('val', k, 0)
        with autocast(device, dtype):
            logits, loss = model(x, y)
        total_loss += loss.item()
        valid = y != -100
        correct += (logits.argmax(-1)[valid] == y[valid]).sum().item()
        counted += valid.sum().item()
        if token_bytes is not None:
            sizes = token_bytes.to(y.device) if sizes is None else sizes  # copied to the device once
            size = sizes[y.clamp(min=0)] * valid  # (B, T) bytes of each target
            per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction='none')
            nats += (per_token * (size.flatten() > 0)).sum().item()
            nbytes += size.sum().item()
    model.train()
    val_loss = total_loss / cfg.eval_iters
    out = {'val_loss': val_loss, 'val_ppl': math.exp(min(val_loss, 50)), 'val_acc': correct / max(1, counted)}
    if nbytes:
        out['val_bpb'] = nats / math.log(2) / nbytes
    return out


def estimate_memory(model, cfg, dtype, model_args):
    """Rough peak bytes (weights, activations) of training model, whose shape model_args gives (not cfg: a
    fine-tuned model is whatever was loaded). Weights: the trained ones with gradients and AdamW state in fp32
    (16 bytes each), frozen ones and buffers as stored. Activations: those kept for backward (~34 values per
    token per layer per channel at 16 bits, Korthikanti et al. 2022) and the logits."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
    act_bytes = 2 if dtype != 'float32' else 4
    tokens = cfg.batch_size * cfg.block_size
    per_layer = tokens * model_args['n_embd'] * 17 * act_bytes
    if cfg.grad_checkpoint:  # only each block's input is kept, plus one block's activations while it reruns
        per_layer, extra = tokens * model_args['n_embd'] * act_bytes, per_layer
    else:
        extra = 0
    activations = model_args['n_layer'] * per_layer + extra + tokens * model_args['vocab_size'] * (act_bytes + 8)
    return 16 * trained + frozen, activations

# ----------------------------------------------------------------------------------------------------------
# the training loop: train() builds a Task, then setup, restore, loop (iterations, evaluations) and save


@dataclass
class Task:
    """What train() trains, built by make_task(cfg, ckpt, device, master): lm_task below, or finetune_lora.py's.
    ckpt is the run's own checkpoint when it resumes (else None): train() loads its state, but a task may need
    it first to build the architecture the state fits."""
    model: torch.nn.Module
    model_args: dict                    # the model's ModelConfig as a dict: saved in checkpoints; the shape --dry_run sizes
    meta: dict                          # saved in checkpoints too: vocab_size and the tokenizer
    batch: Callable                     # batch(split, it, micro) -> (x, y) on the device, a pure function of its
                                        # arguments: a resumed or DDP run sees the batches of one uninterrupted process
    on_save: Optional[Callable] = None  # on_save(model) on rank 0 after each checkpoint (finetune_lora.py: merged model)
    evaluate: Optional[Callable] = None  # evaluate(model) -> {'val_loss', ...} in place of evaluate() below (DPO's
                                         # rewards); every number it returns is logged
    token_bytes: Optional[torch.Tensor] = None  # bytes of text per token id, for evaluate()'s bits per byte


@dataclass
class Process:
    """This process's place in the run, and what it computes on."""
    ddp: bool            # one of torchrun's processes
    rank: int
    local_rank: int
    world: int           # the number of processes
    device: str
    dtype: str
    micro_steps: int     # this process's share of each iteration's gradient_accumulation_steps

    @property
    def master(self):
        return self.rank == 0  # the one that prints, logs and writes files


@dataclass
class Progress:
    """The counters a checkpoint holds beside the model, optimizer and scaler state."""
    iter_num: int = 0                    # iterations done
    best_val_loss: float = float('inf')
    bad_evals: int = 0                   # evaluations since the last new best, for patience
    budget_iters: int = 0                # the max_iters that max_minutes chose (0: not chosen), kept for resume


def lm_task(cfg, ckpt, device, master):
    """What train() trains by default: a model built from cfg (or the checkpoint's architecture on resume) on a
    prepare.py folder, next-token (or, for BERT, masked-token) prediction."""
    if cfg.init_from not in ('scratch', 'resume'):
        raise UserError(f"init_from must be scratch or resume, not '{cfg.init_from}'")

    # resume: the architecture comes from the checkpoint, the rest from this run's settings
    if ckpt is not None:
        default = TrainConfig()
        for k in MODEL_KEYS:  # (keys added since an older checkpoint was written have their defaults)
            saved = ckpt['model_args'].get(k, getattr(ModelConfig(), k))
            if master and getattr(cfg, k) not in (saved, getattr(default, k)):
                print(f"note: {k}={saved!r} from the checkpoint, not {getattr(cfg, k)!r}")
            setattr(cfg, k, saved)

    # data
    if cfg.dry_run and not os.path.isfile(os.path.join(cfg.data_dir, 'meta.json')):
        if not cfg.vocab_size:
            raise UserError("--dry_run without prepared data needs --vocab_size")
        print(f"note: no data in {cfg.data_dir}; the dry run uses random tokens")
        rand = np.random.default_rng(0).integers(0, cfg.vocab_size, 4 * cfg.block_size * cfg.batch_size + 2)
        meta, data = {'vocab_size': cfg.vocab_size, 'tokenizer': None}, {'train': [rand], 'val': [rand]}
    else:
        meta, data = load_data(cfg.data_dir)
        if meta.get('dataset') not in (None, 'text', os.path.basename(os.path.normpath(cfg.data_dir))):
            print(f"note: {cfg.data_dir} holds the {meta['dataset']} dataset ({meta.get('source', '?')})")
    data_vocab = meta['vocab_size']
    mask_id = data_vocab if cfg.model_type == 'bert' else None  # BERT's [MASK] is one token past the data's
    need_vocab = data_vocab + (1 if cfg.model_type == 'bert' else 0)
    vocab_size = cfg.vocab_size or need_vocab
    if vocab_size < need_vocab:
        raise UserError(f"the data's vocabulary ({data_vocab} tokens{' + [MASK]' if mask_id else ''}) is larger "
                        f"than the model's vocab_size={cfg.vocab_size}; set --vocab_size={need_vocab} or 0")
    for split in ('train', 'val'):
        if max(len(a) for a in data[split]) <= cfg.block_size + 1:
            raise UserError(f"the {split} split has {max(len(a) for a in data[split])} tokens, not more than "
                            f"block_size={cfg.block_size}; use a smaller --block_size or more data")

    # model
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model_args['vocab_size'] = vocab_size
    try:
        mconf = ModelConfig(**model_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    docs = None
    if cfg.doc_aligned:
        if meta.get('eot_token') is None or cfg.model_type == 'bert':
            raise UserError(f"doc_aligned=True needs documents separated by an end-of-text token, and "
                            f"{cfg.data_dir} has none ({meta.get('dataset', 'its dataset')} is one text)" if
                            cfg.model_type != 'bert' else "doc_aligned is for decoders (gpt, llama), not bert")
        docs = {split: document_index(data[split], meta['eot_token']) for split in ('train', 'val')}
        for split, index in docs.items():
            if not len(index):
                raise UserError(f"the {split} split of {cfg.data_dir} has no document of 2 tokens or more: "
                                f"doc_aligned needs documents")
        if master:
            lengths = docs['train'][:, 2]
            print(f"doc_aligned: {len(lengths):,} training documents, median {int(np.median(lengths)):,} tokens; "
                  f"{np.mean(lengths > cfg.block_size + 1):.0%} are longer than a row and are cut to one")
    torch.manual_seed(cfg.seed)
    return Task(model=build_model(mconf), model_args=asdict(mconf), meta=meta,
                batch=lambda split, it, micro: get_batch(data, cfg, split, it, micro, device, mask_id, docs),
                token_bytes=None if cfg.model_type == 'bert' else token_bytes(meta, vocab_size))


def train(cfg, make_task=lm_task, resume=False, state_file='ckpt.pt'):
    """Train the Task that make_task builds, as cfg (a LoopConfig) says. Every checkpoint is written to
    out_dir/state_file (finetune_lora.py keeps it beside the merged model it writes as ckpt.pt); resume continues
    from there exactly. Returns the last evaluation dict (None for a dry run)."""
    started = time.time()  # max_minutes counts from here (the imports before it take a second or two)
    check_loop_config(cfg)
    proc = setup(cfg)
    state_path = os.path.join(cfg.out_dir, state_file)
    ckpt = load_checkpoint(state_path, trust=cfg.trust_checkpoint) if resume else None
    task = make_task(cfg, ckpt, proc.device, proc.master)
    raw_model = task.model.to(proc.device)  # not compiled or wrapped: what is counted, saved and handed to on_save
    raw_model.train()  # load_model gives a model in eval mode: without this, dropout would wait for the first eval
    raw_model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.fsdp:
        shard_model(raw_model, proc.dtype)
    device_type = proc.device.split(':')[0]
    optimizer = make_optimizer(raw_model, cfg, proc.device, proc.dtype, fused=not cfg.fsdp)
    scaler = torch.amp.GradScaler(device_type, enabled=(proc.dtype == 'float16'))
    progress = restore(ckpt, raw_model, optimizer, scaler, cfg, proc.master) if ckpt is not None else Progress()
    del ckpt  # its tensors are copied in: free them before training needs the memory
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if proc.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[proc.local_rank] if proc.device.startswith('cuda') else None)
    announce(cfg, proc, task, raw_model)

    step = lambda it: iteration(it, model, optimizer, scaler, task.batch, cfg, proc)  # noqa: E731
    if cfg.dry_run:
        dry_run(cfg, proc, raw_model, task, step, progress.iter_num)
        return None
    result = loop(cfg, proc, progress, optimizer, step, started,
                  run_eval=lambda: (task.evaluate(model) if task.evaluate else
                                    evaluate(model, task.batch, cfg, proc.device, proc.dtype, task.token_bytes)),
                  checkpoint=lambda: save(state_path, raw_model, optimizer, scaler, task, progress, cfg, proc.master),
                  flops=flops_per_token(raw_model, cfg.block_size))
    if proc.ddp:
        torch.distributed.barrier()  # rank 0 may still be writing; Gloo aborts if a peer leaves mid-flight
        torch.distributed.destroy_process_group()
    return result


def setup(cfg):
    """Join torchrun's process group when this is one of its processes (torchrun sets RANK, LOCAL_RANK and
    WORLD_SIZE), then pick the device, dtype and CPU threads."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if cfg.fsdp and not ddp:
        raise UserError("fsdp=True shards the model over several processes: run under "
                        "`torchrun --nproc_per_node=N train.py ...`")
    if ddp:
        import torch.distributed as dist
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        if cfg.gradient_accumulation_steps % world:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible "
                            f"by the number of processes ({world})")
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
        if torch.cuda.is_available():
            cfg.device = f'cuda:{local_rank}'
            torch.cuda.set_device(cfg.device)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Process(ddp, rank, local_rank, world, device, dtype, micro_steps=cfg.gradient_accumulation_steps // world)


def make_optimizer(model, cfg, device, dtype, fused=True):
    """The optimizer cfg.optimizer names (model.configure_optimizers). Muon's Newton-Schulz iterations run in bf16
    when the run computes in bf16 (fast there), else in float32 (CPUs without bf16 matrix instructions emulate
    it ~100x slower; fp16 has too little range for them)."""
    muon = None
    if cfg.optimizer == 'muon':
        muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay,
                    ns_dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32)
    return configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                device.split(':')[0], fused=fused, muon=muon)


def restore(ckpt, model, optimizer, scaler, cfg, master):
    """Load a checkpoint's state into model, optimizer and scaler, and drop the metrics logged after it was
    written (a crash between the two). Returns its counters."""
    was = (ckpt.get('config') or {}).get('optimizer', 'adamw')
    if was != cfg.optimizer:
        raise UserError(f"the checkpoint was trained with optimizer={was}, whose state does not fit "
                        f"{cfg.optimizer}: resume with --optimizer={was}")
    # full (unsharded) tensors keyed by parameter name, as save() writes them: they load under DDP or FSDP too
    set_model_state_dict(model, clean_state_dict(ckpt['model']), options=StateDictOptions(full_state_dict=True))
    # not strict: parameters that never got a gradient (BERT's pooler under MLM) have no optimizer state
    set_optimizer_state_dict(model, optimizer, ckpt['optimizer'],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    progress = Progress(ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('bad_evals', 0), ckpt.get('budget_iters', 0))
    if cfg.max_minutes and progress.budget_iters:  # the run's length was chosen once; a resume keeps it
        if master and cfg.max_iters != progress.budget_iters:
            print(f"note: max_iters={progress.budget_iters}, as max_minutes chose it when the run began")
        cfg.max_iters = progress.budget_iters
    if master:
        truncate_metrics(os.path.join(cfg.out_dir, 'metrics.jsonl'), progress.iter_num)
    return progress


def tokens_per_iter(cfg):
    return cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


def announce(cfg, proc, task, model):
    """On rank 0: the settings, the model and the run's size; and out_dir/config.json, unless this is a dry run."""
    if not proc.master:
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    print_config(cfg)
    print(f"{task.model_args['model_type']}: {num_params(model) / 1e6:.2f}M parameters | device {proc.device} | "
          f"dtype {proc.dtype} | {torch.get_num_threads()} CPU threads | {proc.world} process(es) | "
          f"{tokens_per_iter(cfg):,} tokens/iter")
    if not cfg.dry_run:
        with open(os.path.join(cfg.out_dir, 'config.json'), 'w') as f:
            json.dump(asdict(cfg), f, indent=2)


def iteration(it, model, optimizer, scaler, batch, cfg, proc):
    """Iteration it on this process: its micro-batches, one optimizer step. Returns the loss averaged over all
    processes."""
    torch.manual_seed((cfg.seed * 1_000_003 + it) * 1009 + proc.rank)  # dropout depends on (seed, iteration, rank) only
    batches = (batch('train', it, proc.rank * proc.micro_steps + micro) for micro in range(proc.micro_steps))
    # DDP all-reduces gradients once per iteration; FSDP reduce-scatters them at every micro-step
    loss = train_step(model, optimizer, scaler, batches, proc.micro_steps, proc.device, proc.dtype, cfg.grad_clip,
                      proc.ddp and not cfg.fsdp)
    if proc.ddp:
        torch.distributed.all_reduce(loss)  # a sum: Gloo has no AVG
        loss = loss / proc.world
    return loss


def dry_run(cfg, proc, model, task, step, iter_num):
    """Print the memory the run should need, time one iteration, print what the whole run amounts to."""
    weights, acts = estimate_memory(model, cfg, proc.dtype, task.model_args)
    print(f"estimated memory: {(weights + acts) / 2**30:.2f} GiB (weights, grads and AdamW state "
          f"{weights / 2**30:.2f} GiB; activations of one micro-batch {acts / 2**30:.2f} GiB)")
    t0 = time.time()
    loss = guarded_step(step, iter_num, cfg)
    dt = time.time() - t0
    n, per_iter = num_params(model), tokens_per_iter(cfg)
    total = cfg.max_iters * per_iter
    print(f"the run: {cfg.max_iters:,} iterations x {per_iter:,} tokens = {total / 1e9:.3g}B tokens, "
          f"{total / n:.0f} tokens per parameter (Chinchilla-optimal is ~20)")
    print(f"dry run: one iteration, loss {loss.item():.4f}, {dt:.2f}s, "
          f"{per_iter / proc.world / dt:,.0f} tokens/s per process (incl. warm-up) | "
          f"{flops_per_token(model, cfg.block_size) / 1e6:.1f} MFLOPs/token")
    if proc.device.startswith('cuda'):
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def loop(cfg, proc, progress, optimizer, step, started, run_eval, checkpoint, flops):
    """Iterations from progress.iter_num to max_iters: step(it) trains, a log line every log_interval, run_eval()
    every eval_interval and at the end, then checkpoint() on a new best (or every time: always_save_checkpoint),
    and an early stop after patience evaluations without a new best. flops: per token, for the MFU. Returns the
    last evaluation."""
    metrics_path = os.path.join(cfg.out_dir, 'metrics.jsonl')
    peak = cfg.peak_tflops * 1e12 or (gpu_peak_flops(proc.device) if proc.device.startswith('cuda') else 0)
    per_iter = tokens_per_iter(cfg)
    result = None
    # max_minutes: the warmup iterations are timed, up to 100 (their learning rates do not depend on max_iters),
    # then max_iters is fixed for the rest of the run and recorded for resume
    probe = min(cfg.warmup_iters + 1, 100) if cfg.max_minutes and not progress.budget_iters else 0
    if probe:  # max_iters, when given, stays the most the budget may choose
        cap, step_times = cfg.max_iters, []
        probe = min(probe, cap) if cap else probe
        cfg.max_iters = max(cfg.max_iters, probe, progress.iter_num + 1)
    if progress.iter_num >= cfg.max_iters and proc.master:
        print(f"nothing to do: the checkpoint is at iteration {progress.iter_num} and max_iters={cfg.max_iters}; "
              f"raise --max_iters to train on")
    t_log, iters_since_log = time.time(), 0
    while progress.iter_num < cfg.max_iters:
        it = progress.iter_num  # batches, dropout and the learning rate are functions of it
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_ratio', 1.0)  # Muon's matrices: muon_lr on the same schedule
        t_step = time.time()
        loss = guarded_step(step, it, cfg)
        progress.iter_num = done = it + 1  # iterations done: what logs, evaluations and checkpoints count
        iters_since_log += 1
        if probe:
            loss.item()  # waits for the step (CUDA runs ahead)
            step_times.append(time.time() - t_step)
            if done >= probe:
                probe = choose_max_iters(cfg, proc, progress, step_times, started, cap)

        if done % cfg.log_interval == 0 and proc.master:
            dt = time.time() - t_log
            tps = per_iter * iters_since_log / dt
            record = {'iter': done, 'loss': loss.item(), 'lr': lr, 'tokens_per_sec': tps,
                      'ms_per_iter': 1000 * dt / iters_since_log}
            if peak:  # model FLOPs utilisation: the fraction of the accelerators' peak doing model math
                record['mfu'] = flops * tps / (peak * proc.world)
            append_metrics(metrics_path, record)
            print(f"iter {done}/{'?' if probe else cfg.max_iters}: loss {record['loss']:.4f}, lr {lr:.2e}, "
                  f"{tps:,.0f} tokens/s, {record['ms_per_iter']:.0f} ms/iter"
                  + (f", MFU {record['mfu']:.1%}" if peak else ''))
            t_log, iters_since_log = time.time(), 0

        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            t_eval = time.time()
            result = run_eval()
            improved = result['val_loss'] < progress.best_val_loss
            progress.best_val_loss = min(progress.best_val_loss, result['val_loss'])
            progress.bad_evals = 0 if improved else progress.bad_evals + 1
            stop = cfg.patience and progress.bad_evals >= cfg.patience
            if proc.master:
                append_metrics(metrics_path, {'iter': done, **result})
                print(f"eval at iter {done}: " + ', '.join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}"
                                                           for k, v in result.items())
                      + ('' if improved else f" (best {progress.best_val_loss:.4f})"))
            if improved or cfg.always_save_checkpoint or done == cfg.max_iters or stop:
                checkpoint()
            if stop:
                if proc.master:
                    print(f"early stop: no improvement in {progress.bad_evals} evaluations")
                break
            t_log += time.time() - t_eval  # evaluation time is not training throughput
    return result


def choose_max_iters(cfg, proc, progress, step_times, started, cap=0):
    """Set cfg.max_iters to what fits in max_minutes from started (train() began), at most cap (if not 0): the
    iterations left at the step time of the second half of those timed (the first steps run slower while the
    allocator and caches warm up, up to 20% on a CPU), and the evaluations among them, each estimated as
    eval_iters forward passes at a third of a training micro-step. 2% is kept in hand. Every process takes the
    slowest one's time, so they all agree. Returns 0 (decided)."""
    t = statistics.mean(step_times[len(step_times) // 2:])
    if proc.ddp:
        slowest = torch.tensor([t], dtype=torch.float64, device=proc.device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        t = slowest.item()
    t_eval = cfg.eval_iters * t / (3 * proc.micro_steps)
    left = 0.98 * 60 * cfg.max_minutes - (time.time() - started)
    done = progress.iter_num

    def cost(n):  # seconds from now to iteration n, its evaluations included (one at the end)
        evals = n // cfg.eval_interval + (n % cfg.eval_interval > 0) - done // cfg.eval_interval
        return (n - done) * t + evals * t_eval
    n = done + max(0, int(left / (t + t_eval / cfg.eval_interval)))
    while n > done and cost(n) > left:
        n -= 1
    n = max(done, min(n, cap) if cap else n)
    cfg.max_iters = progress.budget_iters = n
    if proc.master:
        print(f"max_minutes={cfg.max_minutes:g}: {t * 1000:.0f} ms per iteration, so max_iters={n} "
              f"(about {(time.time() - started + cost(n)) / 60:.1f} minutes in all)")
        append_metrics(os.path.join(cfg.out_dir, 'metrics.jsonl'),
                       {'iter': done, 'max_iters': n, 'probe_ms_per_iter': 1000 * t})
        with open(os.path.join(cfg.out_dir, 'config.json'), 'w') as f:
            json.dump(asdict(cfg), f, indent=2)
    return 0


def save(path, model, optimizer, scaler, task, progress, cfg, master):
    """Write the training state to path, then (rank 0) let the task write its own files (task.on_save)."""
    # full (unsharded) tensors keyed by parameter name, so a checkpoint written by one process, by DDP or by
    # FSDP loads into any of them; under FSDP every process takes part in gathering, rank 0 writes
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return
    save_checkpoint({
        'model': model_state, 'optimizer': optim_state, 'scaler': scaler.state_dict(),
        'model_args': task.model_args, **asdict(progress), 'config': asdict(cfg), 'meta': task.meta,
        # batches and dropout are reseeded from (seed, iteration), so this is only for completeness (a tensor:
        # numpy's RNG state would need pickle to load)
        'rng': {'torch': torch.get_rng_state()},
    }, path)
    if task.on_save:
        task.on_save(model)


# dense bf16 peak FLOP/s by GPU name, for the MFU log; --peak_tflops overrides
GPU_PEAK_TFLOPS = {'H100': 989, 'H200': 989, 'A100': 312, 'A10G': 125, 'A10': 125, 'L40S': 362, 'L4': 121,
                   'RTX 4090': 165, 'RTX 3090': 71, 'V100': 125, 'T4': 65}


def gpu_peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in GPU_PEAK_TFLOPS.items() if key in name), 0)


def shard_model(model, dtype):
    """FSDP2: shard every transformer block, then the rest (embeddings, head), over all processes. Parameters
    are gathered in dtype for compute; gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    blocks = model.h if model.config.model_type == 'bert' else model.transformer.h
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def train_step(model, optimizer, scaler, batches, micro_steps, device, dtype, grad_clip=1.0, ddp=False):
    """One optimizer step: forward/backward over micro_steps (x, y) batches, gradients averaged, clipped, applied.
    Returns the mean loss (a tensor: reading it waits for the step). Under DDP the gradients are all-reduced
    once, on the last micro-step."""
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        sync = not ddp or micro == micro_steps - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss / micro_steps).backward()
        loss_sum += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / micro_steps


def guarded_step(step, it, cfg):
    """Run one step and turn an out-of-memory failure into advice."""
    try:
        return step(it)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if 'out of memory' not in str(e) and "can't allocate memory" not in str(e):
            raise
        half = max(1, cfg.batch_size // 2)
        raise UserError(f"a batch of {cfg.batch_size} x {cfg.block_size} tokens does not fit in memory; try "
                        f"--batch_size={half} --gradient_accumulation_steps={cfg.gradient_accumulation_steps * 2} "
                        f"(same tokens per iteration)") from None


def main(argv):
    cfg = parse_config(TrainConfig, argv)
    check_train_config(cfg)
    train(cfg, resume=cfg.init_from == 'resume')


if __name__ == '__main__':
    run_cli(main)

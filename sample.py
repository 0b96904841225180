"""
Sample text from a trained checkpoint.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0

The tokenizer is the one prepare.py recorded in the checkpoint's meta (char, GPT-2 BPE, ...).
"""
import os
import time
from dataclasses import dataclass

import torch

from prepare import load_tokenizer
from train import (UserError, autocast, load_checkpoint, model_from_checkpoint, parse_config, resolve_device,
                   resolve_dtype, run_cli)


@dataclass
class SampleConfig:
    out_dir: str = 'out'             # folder with ckpt.pt, written by train.py
    start: str = '\n'                # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8         # 0 = greedy; < 1 sharper, > 1 more random
    top_k: int = 200                 # keep only the k most likely tokens; 0 = all
    seed: int = 1337
    device: str = 'auto'
    dtype: str = 'auto'


def load_model(out_dir, device):
    """(model in eval mode, meta, checkpoint config) from out_dir/ckpt.pt."""
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), map_location=device)
    model = model_from_checkpoint(ckpt, device)
    model.eval()
    return model, ckpt.get('meta') or {}, ckpt.get('config', {})


def read_prompt(start):
    if start.startswith('FILE:'):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file '{path}' not found")
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    return start


def main(argv):
    cfg = parse_config(SampleConfig, argv)
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0 or cfg.top_k < 0:
        raise UserError("num_samples must be >= 1 and max_new_tokens, temperature and top_k >= 0")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, meta, _ = load_model(cfg.out_dir, device)
    if not hasattr(model, 'generate'):
        raise UserError(f"'{cfg.out_dir}' holds a {model.config.model_type} encoder, which does not generate "
                        f"text; sample from a gpt or llama checkpoint")
    if not meta.get('tokenizer'):
        raise UserError(f"the checkpoint in '{cfg.out_dir}' has no tokenizer metadata (was it a dry run?)")
    encode, decode = load_tokenizer(meta)
    prompt = read_prompt(cfg.start)
    ids = encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens: give --start some text")
    block = model.config.block_size
    if len(ids) > block:
        print(f"note: the prompt has {len(ids)} tokens; only the last {block} (block_size) are seen")
    torch.manual_seed(cfg.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for k in range(cfg.num_samples):
        t0 = time.time()
        with autocast(device, dtype):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
        dt = time.time() - t0
        print(decode(y[0].tolist()))
        print(f'--------------- ({cfg.max_new_tokens} tokens in {dt:.1f}s, {cfg.max_new_tokens / max(dt, 1e-9):.0f} tokens/s)')


if __name__ == '__main__':
    run_cli(main)

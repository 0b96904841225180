"""
Generate text and chat, from a train.py checkpoint or pretrained Hugging Face weights (eval.py scores them).

    python sample.py --init_from=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start="The meaning of life is" --stream=True
    python sample.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --chat=True
    python sample.py --init_from=SmolLM2-135M-Instruct.Q4_1.gguf --chat=True   # a llama.cpp / Ollama file
    python sample.py --init_from=out-x --prompts=prompts.jsonl --output=answers.jsonl

init_from is a train.py out_dir (ckpt.pt), a Hugging Face model folder (config.json + weights), gpt2 ..
gpt2-xl, hf:org/name (downloaded once into a cache), or a .gguf file (llama.cpp, Ollama). Text goes through the
model's own tokenizer: the one prepare.py recorded for our checkpoints, tiktoken's GPT-2 encoding for GPT-2,
tokenizer.json or the GGUF's metadata for the others; chat through the model's own template, run as Jinja.
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from configurator import UserError, atomic_write, decode_file, jsonl_lines, parse_config, run_cli, writable_file
from model import pack_linears
from train import chat_style, load_model, resolve_device, resolve_dtype, stream_text


@dataclass
class SampleConfig:
    init_from: str = 'out'           # train.py out_dir | gpt2 .. gpt2-xl | hf:org/name | Hugging Face folder | .gguf
    out_dir: str = ''                # nanoGPT's name for a train.py out_dir to sample from: the same as init_from
    start: str = '\n'                # the prompt, or FILE:path to read it from a file
    prompts: str = ''                # a file of prompts (.txt: one per line; .jsonl: {"prompt": ...}) -> JSONL
    output: str = ''                 # where --prompts writes its JSONL; '' = stdout
    num_samples: int = 3
    batch_size: int = 8              # rows decoded together
    max_new_tokens: int = 500
    temperature: float = 0.8         # 0 = greedy; < 1 sharper, > 1 more random
    top_k: int = 200                 # keep only the k most likely tokens; 0 = all
    top_p: float = 1.0               # keep the most likely tokens that together reach this probability
    min_p: float = 0.0               # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the text less likely
    stop: str = ''                   # end a sample where this text appears (\n works), e.g. --stop='\n\n'
    seed: int = 1337
    stream: bool = False             # print tokens as they are generated
    chat: bool = False               # interactive chat with history, in the model's chat template
    system: str = ''                 # chat: the system prompt
    device: str = 'auto'
    dtype: str = 'auto'              # float32 | bfloat16 | float16 | auto; weights are converted to it
    compile: bool = False            # torch.compile the model's forward
    pack: bool = True                # CPU: pre-pack weights for oneDNN, 2-2.5x faster decoding (pack_linears)
    trust_checkpoint: bool = False   # load checkpoints that need pickle (it can run code): trusted files only


# ----------------------------------------------------------------------------------------------------------
# turning tokens into text

def unescape(text):
    r"""'\n' and '\t' typed on a command line or in a .txt line as the characters (other text, accents included,
    stays as it is)."""
    return text.replace('\\n', '\n').replace('\\t', '\t')


def stop_strings(cfg):
    return [unescape(cfg.stop)] if cfg.stop else []


def finish(ids, tok, stop, max_new_tokens):
    """(text, finish_reason) of one row's new tokens: 'stop' at EOS or a stop string, else 'length'."""
    text = ''.join(stream_text(([t] for t in ids), tok, stop))
    eos = set([tok.eos_id] if isinstance(tok.eos_id, int) else tok.eos_id or [])
    stopped = (ids and ids[-1] in eos) or any(s in tok.decode(ids) for s in stop)
    return text, 'stop' if stopped or len(ids) < max_new_tokens else 'length'


def gen_options(cfg, tok):
    return dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p, min_p=cfg.min_p or None,
                repetition_penalty=cfg.repetition_penalty, eos_id=tok.eos_id, stop=stop_strings(cfg) or None,
                decode=tok.decode)


# ----------------------------------------------------------------------------------------------------------
# chat

def chat(model, tok, cfg):
    style = chat_style(tok)
    stop = style.stop
    system = [{'role': 'system', 'content': cfg.system}] if cfg.system else []
    messages = list(system)
    room = model.config.block_size - min(cfg.max_new_tokens, model.config.block_size // 2)
    print(f"chat with {cfg.init_from} ({style.name} format). /reset forgets the conversation; /quit or Ctrl-D ends.")
    while True:
        try:
            line = input('\n> ')
        except EOFError:
            break
        if line.strip() in ('/quit', '/exit'):
            break
        if line.strip() == '/reset':
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({'role': 'user', 'content': line})
        ids = style.encode_prompt(messages)  # what you type is text: '<|im_end|>' in it cannot end your turn
        while len(ids) > room and len(messages) > len(system) + 1:  # forget the oldest turns first
            messages = system + messages[len(system) + 2:]
            ids = style.encode_prompt(messages)
        opts = {**gen_options(cfg, tok), 'stop': stop, 'seed': None}
        reply = ''
        for piece in stream_text(model.generate_stream([ids], cfg.max_new_tokens, **opts), tok, stop):
            print(piece, end='', flush=True)
            reply += piece
        print()
        messages.append({'role': 'assistant', 'content': reply.strip()})


# ----------------------------------------------------------------------------------------------------------
# prompts from the command line or a file

def read_prompt(start):
    if start.startswith('FILE:'):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file '{path}' not found")
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    return start


def read_prompts(path):
    """Prompts from a .txt file (one per line, \\n escapes allowed) or .jsonl ({"prompt": ...} or a string)."""
    if not os.path.isfile(path):
        raise UserError(f"prompts file '{path}' not found")
    text, why = decode_file(path)
    if text is None:
        raise UserError(f"prompts file '{path}' {why}: give a .txt or .jsonl file")
    if not path.endswith('.jsonl'):
        prompts = [unescape(line) for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for n, rec in jsonl_lines(text, path, '; each line must be {"prompt": "..."}'):
            prompt = rec if isinstance(rec, str) else rec.get('prompt') if isinstance(rec, dict) else None
            if not isinstance(prompt, str):
                raise UserError(f"{path}:{n} has no \"prompt\" string; each line must be {{\"prompt\": \"...\"}}")
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompts file '{path}' has no prompts")
    return prompts


def encode_prompt(tok, prompt, block_size, where='the prompt'):
    ids = tok.encode(prompt)
    if not ids:
        raise UserError(f"{where} encodes to no tokens: give it some text")
    bos = getattr(tok, 'bos_id', None)  # models that expect their BOS first (Llama 2): added as HF's tokenizer does
    if bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    if len(ids) >= block_size:
        print(f"note: {where} has {len(ids)} tokens; only the last {block_size - 1} are seen (block_size "
              f"{block_size} with room for one new token)", file=sys.stderr)
    return ids


def write_jsonl(records, path):
    lines = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    if not path:
        sys.stdout.write(lines)
        return
    with atomic_write(path, 'w', encoding='utf-8') as f:  # whole or not at all
        f.write(lines)


def complete_file(model, tok, cfg):
    """Every prompt of cfg.prompts, decoded cfg.batch_size at a time, as JSONL records."""
    prompts = read_prompts(cfg.prompts)
    block, stop, records, t0 = model.config.block_size, stop_strings(cfg), [], time.time()
    for i in range(0, len(prompts), cfg.batch_size):
        batch = prompts[i:i + cfg.batch_size]
        ids = [encode_prompt(tok, p, block, f'prompt {i + j + 1}') for j, p in enumerate(batch)]
        out = model.generate(ids, cfg.max_new_tokens, **gen_options(cfg, tok), seed=cfg.seed + i)
        for p, x, y in zip(batch, ids, out):
            text, reason = finish(y[len(x):], tok, stop, cfg.max_new_tokens)
            records.append({'prompt': p, 'completion': text, 'prompt_tokens': len(x),
                            'completion_tokens': len(y) - len(x), 'finish_reason': reason})
    write_jsonl(records, cfg.output)
    n = sum(r['completion_tokens'] for r in records)
    print(f"{len(records)} prompts, {n} new tokens in {time.time() - t0:.1f}s"
          + (f" -> {cfg.output}" if cfg.output else ''), file=sys.stderr)


def sample(model, tok, cfg):
    """cfg.num_samples continuations of one prompt, printed (streamed one after another, or decoded as a batch)."""
    ids = encode_prompt(tok, read_prompt(cfg.start), model.config.block_size)
    prompt_text, stop = tok.decode(ids), stop_strings(cfg)
    for k in range(0, cfg.num_samples, 1 if cfg.stream else cfg.batch_size):
        rows = 1 if cfg.stream else min(cfg.batch_size, cfg.num_samples - k)
        t0, n = time.time(), 0
        steps = model.generate_stream([ids] * rows, cfg.max_new_tokens, **gen_options(cfg, tok), seed=cfg.seed + k)
        if cfg.stream:
            counted = []
            print(prompt_text, end='', flush=True)
            for piece in stream_text((counted.append(s) or s for s in steps), tok, stop):
                print(piece, end='', flush=True)
            n = len(counted)
            print()
        else:
            new = [[] for _ in range(rows)]
            for step in steps:
                for row, t in zip(new, step):
                    row.extend([] if t is None else [t])
            n = sum(map(len, new))
            for row in new:
                print(prompt_text + finish(row, tok, stop, cfg.max_new_tokens)[0])
        dt = time.time() - t0
        print(f'--------------- ({n} tokens in {dt:.1f}s, {n / max(dt, 1e-9):.0f} tokens/s)')


EVAL_KEYS = ('--eval_data', '--eval_mc', '--eval_split', '--eval_stride', '--max_eval_tokens', '--max_eval_items',
             '--report')


def main(argv):
    if any(a.split('=')[0] in EVAL_KEYS for a in argv):
        raise UserError("evaluation has moved to eval.py: python eval.py --init_from=MODEL --tasks=text "
                        "--data=FILE_OR_DATA_FOLDER (or --tasks=hellaswag,mmlu,... --data_dir=FOLDER)")
    cfg = parse_config(SampleConfig, argv)
    if cfg.out_dir:
        if cfg.init_from not in (SampleConfig.init_from, cfg.out_dir):
            raise UserError(f"give --init_from or --out_dir (nanoGPT's name for it), not both: {cfg.init_from!r} "
                            f"and {cfg.out_dir!r}")
        cfg.init_from = cfg.out_dir
    writable_file(cfg.output, 'output')
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0 or cfg.top_k < 0 or cfg.batch_size < 1:
        raise UserError("num_samples and batch_size must be >= 1 and max_new_tokens, temperature and top_k >= 0")
    if not (0 < cfg.top_p <= 1 and 0 <= cfg.min_p < 1 and cfg.repetition_penalty > 0):
        raise UserError("top_p must be in (0, 1], min_p in [0, 1) and repetition_penalty > 0")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = load_model(cfg.init_from, device, dtype, cfg.trust_checkpoint)
    if cfg.compile:  # inductor packs the weights itself
        model.forward = torch.compile(model.forward, dynamic=True)
    elif cfg.pack and device == 'cpu':
        pack_linears(model)
    if not hasattr(model, 'generate'):
        raise UserError(f"'{cfg.init_from}' holds a {model.config.model_type} encoder, which does not generate "
                        f"text; sample from a gpt or llama checkpoint")
    torch.manual_seed(cfg.seed)
    if cfg.chat:
        chat(model, tok, cfg)
    elif cfg.prompts:
        complete_file(model, tok, cfg)
    else:
        sample(model, tok, cfg)


if __name__ == '__main__':
    run_cli(main)

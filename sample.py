"""
Generate text, chat and evaluate, from a train.py checkpoint or pretrained Hugging Face weights.

    python sample.py --init_from=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start="The meaning of life is" --stream=True
    python sample.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct --chat=True
    python sample.py --init_from=SmolLM2-135M-Instruct.Q4_1.gguf --chat=True   # a llama.cpp / Ollama file
    python sample.py --init_from=out-x --prompts=prompts.jsonl --output=answers.jsonl
    python sample.py --init_from=gpt2 --eval_data=wiki.valid.tokens      # perplexity, next-token accuracy
    python sample.py --init_from=gpt2 --eval_mc=hellaswag_val.jsonl      # multiple-choice accuracy

init_from is a train.py out_dir (ckpt.pt), a Hugging Face model folder (config.json + weights), gpt2 ..
gpt2-xl, hf:org/name (downloaded once into a cache), or a .gguf file (llama.cpp, Ollama). Text goes through the
model's own tokenizer: the one prepare.py recorded for our checkpoints, tiktoken's GPT-2 encoding for GPT-2,
tokenizer.json or the GGUF's metadata for the others; chat through the model's own template, run as Jinja.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import types
import unicodedata
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.nn import functional as F

import bpe
from ggml_quants import GGUFError
from model import PretrainedError, from_pretrained, pretrained_folder
from prepare import bpe_from_text, decode_file, load_tokenizer, tiktoken_encoding, tokenizer_identity
from quantize import load_quantized
from train import (UserError, load_checkpoint, load_data, model_from_checkpoint, parse_config, resolve_device,
                   resolve_dtype, run_cli, writable_file)
from weights import model_from_gguf, read_gguf


@dataclass
class SampleConfig:
    init_from: str = 'out'           # train.py out_dir | gpt2 .. gpt2-xl | hf:org/name | Hugging Face folder
    start: str = '\n'                # the prompt, or FILE:path to read it from a file
    prompts: str = ''                # a file of prompts (.txt: one per line; .jsonl: {"prompt": ...}) -> JSONL
    output: str = ''                 # where --prompts writes its JSONL; '' = stdout
    num_samples: int = 3
    batch_size: int = 8              # rows decoded (or evaluated) together
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
    eval_data: str = ''              # a text file or a prepare.py folder: perplexity and next-token accuracy
    eval_split: str = 'val'          # which split of a prepare.py folder
    eval_mc: str = ''                # JSONL of multiple-choice items (HellaSwag style): accuracy
    eval_stride: int = 0             # evaluation windows advance by this many tokens; 0 = block_size // 2
    max_eval_tokens: int = 0         # evaluate on the first this many tokens; 0 = all
    max_eval_items: int = 0          # multiple choice: the first this many items; 0 = all
    report: str = ''                 # write the evaluation figures here as JSON
    device: str = 'auto'
    dtype: str = 'auto'              # float32 | bfloat16 | float16 | auto; weights are converted to it
    compile: bool = False            # torch.compile the model's forward
    pack: bool = True                # CPU: pre-pack weights for oneDNN, 2-2.5x faster decoding (pack_linears)
    trust_checkpoint: bool = False   # load checkpoints that need pickle (it can run code): trusted files only


# ----------------------------------------------------------------------------------------------------------
# models and their tokenizers

def tiktoken_tokenizer(name):
    enc = tiktoken_encoding(name)
    return SimpleNamespace(encode=lambda s: enc.encode(s, allowed_special='all'), eos_id=enc.eot_token,
                           decode=lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab], errors='replace'),
                           identity=json.dumps('tiktoken'), chat_template=None, bpe=None,
                           meta={'kind': 'tiktoken', 'name': name})


def meta_tokenizer(meta):
    """The tokenizer prepare.py recorded in a checkpoint's meta, with its end-of-text id when it has one."""
    tok = meta.get('tokenizer') or {}
    if tok.get('kind') == 'tiktoken':
        return tiktoken_tokenizer(tok['name'])
    ident = {'chars': tok.get('chars')} if tok.get('kind') == 'char' else tokenizer_identity(tok)  # vocab and order
    if tok.get('kind') == 'bpe':  # ours, or one a fine-tuned model kept from a tokenizer.json or GGUF
        out = bpe_tokenizer(bpe_from_text(tok['model'], 'the checkpoint'))
        out.meta, out.identity, out.eos_id = tok, json.dumps(ident, sort_keys=True), tok.get('eos_id', out.eos_id)
        out.chat_template = tok.get('chat_template', out.chat_template)
        return out
    encode, decode = load_tokenizer(meta)
    return SimpleNamespace(encode=encode, decode=decode, eos_id=tok.get('eos_id'), meta=tok, bpe=None,
                           chat_template=tok.get('chat_template'), identity=json.dumps(ident, sort_keys=True))


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
    """The tokenizer interface of load_model for a bpe.Tokenizer read from a tokenizer.json or a GGUF file."""
    eos = list(dict.fromkeys(i for i in (tok.eos_token_id, tok.special_tokens.get('<|im_end|>'),
                                         tok.special_tokens.get('<|eot_id|>')) if i is not None))
    encode = lambda s: tok.encode(s, allowed_special='all')  # noqa: E731
    try:  # tiktoken encodes ~50x faster, and can when the ids follow the merge order (GPT-2, Llama 3, Qwen2)
        enc = tok.to_tiktoken()
        norm = (lambda s: unicodedata.normalize(tok.normalizer, s)) if tok.normalizer else (lambda s: s)
        encode = lambda s: enc.encode(norm(s), allowed_special='all')  # noqa: E731
    except bpe.BPEError:
        pass
    text = tok.dumps()  # what a checkpoint fine-tuned from this model carries (finetune_lora.py)
    meta = {'kind': 'bpe', 'model': text, 'sha256': hashlib.sha256(text.encode()).hexdigest(), 'eos_id': eos,
            'chat_template': tok.chat_template}
    decode = lambda ids: tok.decode([i for i in ids if i in tok.vocab])  # noqa: E731  (a padded vocabulary's)
    # bos_id: the id a plain prompt starts with when the model expects it (add_bos_token); a chat template writes it
    return SimpleNamespace(encode=encode, decode=decode, eos_id=eos, chat_template=tok.chat_template, meta=meta,
                           identity=json.dumps(tokenizer_identity(meta), sort_keys=True), bpe=tok,
                           bos_id=tok.bos_token_id if getattr(tok, 'add_bos_token', False) else None)


def pack_linears(model, pack=True):
    """model.pack_linears, kept under its old name for the scripts that import it from here. generate packs by
    itself on CPU; pack=False frees the packed copies and keeps generate from packing this model again."""
    import model as model_py  # (the lead: move into the `from model import ...` line above)
    return model_py.pack_linears(model, pack)


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
# turning tokens into text

def unescape(text):
    r"""'\n' and '\t' typed on a command line or in a .txt line as the characters (other text, accents included,
    stays as it is)."""
    return text.replace('\\n', '\n').replace('\\t', '\t')


def stop_strings(cfg):
    return [unescape(cfg.stop)] if cfg.stop else []


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

class ChatFormat:
    """How a model writes a conversation: its own chat template run as Jinja, exactly as transformers'
    apply_chat_template runs it (SmolLM2's adds a default system prompt, Llama 3's a date line), or for a model
    without a template, plain 'User: ...' / 'Assistant: ...' turns."""
    SENTINEL = '\x00reply\x00'  # an assistant message no one writes, to find where a reply ends in the template

    def __init__(self, tok):
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


def chat_style(tok):
    """The ChatFormat of a load_model tokenizer."""
    return ChatFormat(tok)


def chat_prompt(messages, style):
    """The text of a conversation that ends where the assistant's reply begins, in style (a ChatFormat)."""
    return style.prompt(messages)


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
        ids = tok.encode(chat_prompt(messages, style))
        while len(ids) > room and len(messages) > len(system) + 1:  # forget the oldest turns first
            messages = system + messages[len(system) + 2:]
            ids = tok.encode(chat_prompt(messages, style))
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


def read_prompts(path):
    """Prompts from a .txt file (one per line, \\n escapes allowed) or .jsonl ({"prompt": ...} or a string)."""
    if not os.path.isfile(path):
        raise UserError(f"prompts file '{path}' not found")
    text, why = decode_file(path)
    if text is None:
        raise UserError(f"prompts file '{path}' {why}: give a .txt or .jsonl file")
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not path.endswith('.jsonl'):
            prompts.append(unescape(line))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be {{\"prompt\": \"...\"}}") from None
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
    with open(path + '.tmp', 'w', encoding='utf-8') as f:  # whole or not at all
        f.write(lines)
    os.replace(path + '.tmp', path)


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


# ----------------------------------------------------------------------------------------------------------
# evaluation

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


def read_mc(path):
    """Multiple-choice items from JSONL: {"ctx" | "context", "endings" | "choices", "label" | "gold"}."""
    if not os.path.isfile(path):
        raise UserError(f"multiple-choice file '{path}' not found")
    items = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ctx = rec.get('ctx', rec.get('context'))
                endings = rec.get('endings', rec.get('choices'))
                label = int(rec.get('label', rec.get('gold')))
                assert isinstance(ctx, str) and isinstance(endings, list) and all(isinstance(e, str) for e in endings)
                assert 0 <= label < len(endings)
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError, AssertionError):
                raise UserError(f"{path}:{n} is not a multiple-choice item: each line needs \"ctx\" (text), "
                                f"\"endings\" (a list of texts) and \"label\" (the right ending's index)") from None
            items.append((ctx, endings, label))
    if not items:
        raise UserError(f"multiple-choice file '{path}' has no items")
    return items


@torch.no_grad()
def score_endings(model, tok, ctx, endings):
    """Summed loss and token count of each ending after the context, all endings in one batch."""
    block, device = model.config.block_size, next(model.parameters()).device
    ctx_ids, rows = tok.encode(ctx), []
    for e in endings:  # an ending continues the context after a space, as HellaSwag's do
        cont = tok.encode(e if ctx[-1:].isspace() or e[:1].isspace() else ' ' + e)
        seq = (ctx_ids + cont)[-(block + 1):]
        rows.append((seq, min(len(cont), len(seq) - 1)))
    T = max(len(s) for s, _ in rows) - 1
    x = torch.tensor([s[:-1] + [0] * (T + 1 - len(s)) for s, _ in rows], device=device)
    y = torch.tensor([[-100] * (len(s) - 1 - n) + s[-n:] + [-100] * (T + 1 - len(s)) for s, n in rows], device=device)
    nll = F.cross_entropy(model(x)[0].float().transpose(1, 2), y, ignore_index=-100, reduction='none').sum(1)
    return nll.tolist(), [n for _, n in rows]


def eval_mc(model, tok, items):
    """acc: the ending with the lowest summed loss is right; acc_norm: the lowest loss per token."""
    hits, hits_norm = 0, 0
    for ctx, endings, label in items:
        losses, counts = score_endings(model, tok, ctx, endings)
        hits += min(range(len(endings)), key=lambda i: losses[i]) == label
        hits_norm += min(range(len(endings)), key=lambda i: losses[i] / counts[i]) == label
    return {'acc': hits / len(items), 'acc_norm': hits_norm / len(items), 'items': len(items)}


def evaluate(model, tok, cfg):
    report = {'init_from': cfg.init_from, 'dtype': str(next(model.parameters()).dtype).replace('torch.', '')}
    t0 = time.time()
    if cfg.eval_data:
        r = eval_tokens(model, eval_data_tokens(cfg, tok), cfg.eval_stride, cfg.batch_size)
        print(f"{cfg.eval_data}: loss {r['loss']:.4f}, perplexity {r['ppl']:.3f}, next-token accuracy "
              f"{r['acc']:.2%} over {r['tokens']:,} tokens")
        report['text'] = {'data': cfg.eval_data, **r}
    if cfg.eval_mc:
        items = read_mc(cfg.eval_mc)[:cfg.max_eval_items or None]
        r = eval_mc(model, tok, items)
        print(f"{cfg.eval_mc}: accuracy {r['acc']:.2%}, length-normalised {r['acc_norm']:.2%} over {r['items']} items")
        report['multiple_choice'] = {'data': cfg.eval_mc, **r}
    report['seconds'] = round(time.time() - t0, 1)
    if cfg.report:
        with open(cfg.report, 'w') as f:
            json.dump(report, f, indent=2)


def main(argv):
    cfg = parse_config(SampleConfig, argv)
    writable_file(cfg.output, 'output')
    writable_file(cfg.report, 'report')
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
    if cfg.eval_data or cfg.eval_mc:
        if model.config.model_type == 'bert':
            raise UserError("perplexity and multiple choice need a decoder (gpt or llama), not a bert encoder")
        return evaluate(model, tok, cfg)
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

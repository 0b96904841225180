"""
Fine-tune a pretrained or trained model: all weights, LoRA adapters, or QLoRA (4-bit NF4 base + adapters).

    python finetune_lora.py --init_from=gpt2 --data=../shared/data/instruct/instruction-data.json --mode=lora
    python finetune_lora.py config/lora_gpt2_instruct.py --mode=qlora --lora_targets=all
    python finetune_lora.py --init_from=out-shakespeare-char --task=lm --data_dir=data/shakespeare_char --mode=full

It builds the model and the batches and hands them to train.py's loop (AMP, gradient accumulation, evaluation,
early stopping, exact resume with --resume=True, DDP under torchrun). At every checkpoint out_dir gets
adapter.pt (the adapters alone, with their settings and a fingerprint of the base) and ckpt.pt, the merged
model, which sample.py loads like any checkpoint.
"""
import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from quantize import BLOCK_LINEAR, NF4Linear, set_module
from configurator import UserError, atomic_write, check_ranges, parse_config, run_cli, writable_dir
from model import pack_linears
from train import (LoopConfig, Task, autocast, batch_rng, chat_style, get_batch, load_checkpoint, load_data, load_model,
                   meta_tokenizer, read_json_records, resolve_device, resolve_dtype, save_checkpoint, train)

# ----------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4Linear) plus a trainable low-rank update (Hu et al. 2021):
    y = base(x) + B(A(dropout(x))) * alpha / r, with A (r, in) and B (out, r). B starts at zero, so the wrapped
    model computes exactly what the base did until the first step. A and B are fp32 whatever the base dtype
    (they are the weights the optimizer updates) and are cast to the input's dtype in forward."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(base.buffers() if isinstance(base, NF4Linear) else base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight, as the paper's code
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base alone (DPO's reference model, see adapters_off)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = F.linear(self.dropout(x), A)                        # (..., in) -> (..., r)
        return self.base(x) + F.linear(h, B) * self.scaling  # (..., r) -> (..., out)

    def delta_weight(self):
        """The fp32 (out, in) update scaling * B @ A that merging adds to the base weight."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self):
        """A plain nn.Linear with weight W + scaling * B @ A: the same outputs with one matmul instead of three.
        The merged layer is fp32 (an NF4 base is dequantized)."""
        if isinstance(self.base, NF4Linear):
            lin = self.base.to_linear()
        else:  # fp32 even over a bf16 base: a small update added in bf16 would be rounded away
            lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                            device=self.base.weight.device, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.copy_(self.base.weight)
                if self.base.bias is not None:
                    lin.bias.copy_(self.base.bias)
        with torch.no_grad():
            lin.weight.copy_(lin.weight.float() + self.delta_weight())
        return lin.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


# module-name regexes (re.search) of the Linears to adapt; 'all' is every Linear but the output head and classifier
TARGETS = {
    'attn': r'attn\.(qkv|proj)$',
    'mlp': r'mlp\.(fc|proj|gate_up)$',
    'all': r'^(?!(lm_head|classifier)$)',
}


@contextlib.contextmanager
def adapters_off(model):
    """Run model as its base: every LoRA update switched off, in eval mode (no dropout), so the frozen base is
    DPO's reference model without a second copy of its weights in memory."""
    layers, was_training = [m for m in model.modules() if isinstance(m, LoRALinear)], model.training
    for m in layers:
        m.enabled = False
    model.eval()
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        model.train(was_training)


def _linears(model):
    # (name, module) of every linear layer, quantized or not
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]


def apply_lora(model, target='attn', r=8, alpha=16, dropout=0.0, qlora=False, block_size=64, train_extra=()):
    """Freeze model and wrap the Linears whose names match target (a TARGETS key or a regex) in LoRALinear.
    qlora: every Linear of the transformer blocks (targets or not) is first stored as NF4 (block_size weights per
    scale); embeddings, output head and classifier stay in full precision. train_extra: regexes of parameter
    names to keep trainable too (e.g. 'classifier' for a classification head). Returns the wrapped names and
    records the settings in model.lora_config."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: apply_lora once per model")
    pattern = TARGETS.get(target, target)
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoRA target {target!r} is not attn, mlp, all or a valid regex ({e})") from None
    linears = _linears(model)
    names = [n for n, _ in linears if re.search(pattern, n)]
    if not names:
        some = ', '.join(n for n, _ in linears[:4])
        raise ValueError(f"LoRA target {target!r} (pattern {pattern!r}) matches no Linear; Linears are e.g. {some}")
    model.requires_grad_(False)
    for name, lin in linears:
        if qlora and BLOCK_LINEAR.search(name):
            lin = NF4Linear.from_linear(lin, block_size)
        if name in names:
            lin = LoRALinear(lin, r, alpha, dropout)
        set_module(model, name, lin)
    _train_extra(model, train_extra)
    model.lora_config = dict(target=target, r=r, alpha=alpha, dropout=dropout, qlora=qlora, block_size=block_size,
                             train_extra=list(train_extra))
    return names


def _train_extra(model, patterns):
    # parameters besides the adapters that train too (a fresh classification head, say)
    for pat in patterns:
        params = [p for n, p in model.named_parameters() if re.search(pat, n)]
        if not params:
            raise ValueError(f"train_extra pattern {pat!r} matches no parameter")
        for p in params:
            p.requires_grad_(True)


def merge_lora(model, dequantize=True):
    """Replace every LoRALinear by its merged nn.Linear, in place; with dequantize also every remaining NF4Linear
    by an fp32 nn.Linear, so the model is a plain one again (its state_dict loads into build_model's).
    Returns the merged names."""
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in merged:
        set_module(model, name, model.get_submodule(name).merge())
    if dequantize:
        for name, m in _linears(model):
            if isinstance(m, NF4Linear):
                set_module(model, name, m.to_linear())
    model.lora_config = None
    return merged


def lora_state_dict(model):
    """The adapter tensors (lora_A, lora_B) and any other trainable ones (train_extra), keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or '.lora_' in n}


def load_lora(model, state, fingerprint=None):
    """Copy adapter tensors from lora_state_dict into a model that went through apply_lora with the same settings.
    Refuses (ValueError) names or shapes that differ, and with a fingerprint a different base model."""
    if fingerprint is not None:
        check_base(model, fingerprint)
    ours = lora_state_dict(model)
    missing, extra = [k for k in ours if k not in state], [k for k in state if k not in ours]
    if missing or extra:
        raise ValueError(f"adapter does not fit this model (different target or train_extra?): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, the model's {tuple(ours[k].shape)} "
                             "(different rank or base model?)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def _fingerprint_tensors(model):
    # tensors that neither LoRA, QLoRA nor training touch: outside every linear layer (embeddings, norms), not extras
    linear = {f'{n}.{k}' for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear, LoRALinear))
              for k in m.state_dict()}
    extra = (getattr(model, 'lora_config', None) or {}).get('train_extra', [])
    for name, t in model.state_dict().items():
        if t.is_floating_point() and name not in linear and not any(re.search(p, name) for p in extra):
            yield name, t


def base_fingerprint(model):
    """What identifies the base model an adapter was trained on, to save beside the adapter: its config, and per
    untouched tensor (embeddings, norms) the shape, mean |x| and 8 sampled values. Small, and unlike a hash it
    survives a cast to bf16 or a quantized base, which do not change the model."""
    tensors = {}
    for name, t in _fingerprint_tensors(model):
        flat = t.detach().float().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, 8, dtype=torch.float64).long()  # float32 rounds past 2**24
        tensors[name] = dict(shape=list(t.shape), absmean=flat.abs().mean().item(), values=flat[idx].tolist())
    config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else dict(model.config)
    config.pop('dropout', None)  # dropout does not change the weights
    return dict(config=config, tensors=tensors)


def check_base(model, fingerprint, rtol=2e-2):
    """Raise ValueError when model is not the base model that fingerprint (base_fingerprint) describes. Values
    may differ by rtol of their scale (a bf16 copy of the same weights passes; other weights do not)."""
    ours = base_fingerprint(model)
    diff = [k for k in set(ours['config']) | set(fingerprint['config'])
            if ours['config'].get(k) != fingerprint['config'].get(k)]
    if diff:
        k = sorted(diff)[0]
        raise ValueError(f"adapter was trained on a different base model: config {k} is "
                         f"{fingerprint['config'].get(k)!r} there, {ours['config'].get(k)!r} here")
    for name, want in fingerprint['tensors'].items():  # ours may hold more: train_extra tensors, say
        have = ours['tensors'].get(name)
        tol = rtol * (want['absmean'] + 1e-6)
        if have is None or have['shape'] != want['shape'] or abs(have['absmean'] - want['absmean']) > tol or \
                any(abs(a - b) > tol + rtol * abs(b) for a, b in zip(have['values'], want['values'])):
            raise ValueError(f"adapter was trained on a different base model: its weights differ at {name}")


def count_params(model):
    """(trainable, total) parameters, each counted once; an NF4Linear counts the in*out weights it stands for."""
    params = list(model.parameters())
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + nf4


# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FinetuneConfig(LoopConfig):
    """train.py's loop settings (LoopConfig) and what fine-tuning adds. The model is the one init_from names, so
    there are no model-shape keys: --n_layer=4 here is an unknown key, not a setting quietly ignored."""
    init_from: str = 'gpt2'         # the base: a train.py out_dir, gpt2 .. gpt2-xl, hf:org/name, a HF folder
    resume: bool = False            # continue this out_dir's run exactly (from out_dir/state_file)
    state_file: str = 'train_state.pt'  # resumable training state; ckpt.pt is the merged model sample.py loads
    mode: str = 'lora'              # full | lora | qlora (base weights in 4-bit NF4, adapters in full precision)
    task: str = 'sft'               # sft (instructions) | distill (learn from --teacher) | dpo (preference pairs)
                                    # | lm (a prepare.py folder, see data_dir) | classify
    data: str = ''                  # sft, distill: JSON/JSONL of {instruction, input, output}, {messages} or
                                    # {conversations}; dpo: {prompt, chosen, rejected} (or an SFT set, make_pairs)
    data_dir: str = 'data/shakespeare_char'  # lm: a prepare.py folder made with the model's tokenizer
    template: str = 'alpaca'        # prompt format: alpaca | chat (the model's chat format, for messages)
    val_fraction: float = 0.1       # examples held out for evaluation
    val_data: str = ''              # held-out examples from this file instead (sft, distill, dpo): compare runs on one set
    limit: int = 0                  # use the first N records of data (0 = all): a quick run
    pack: bool = False              # sft, distill: several examples per row, each attending only to itself
    # distillation: the teacher is any model load_model takes (a GGUF file too)
    teacher: str = ''
    distill: str = 'sequence'       # sequence: learn the teacher's answers | logits: match its next-token
                                    # distribution on the data's answers | both (needs a shared tokenizer)
    distill_temperature: float = 2.0  # softens both distributions; the KL is scaled by T^2 (Hinton et al. 2015)
    distill_alpha: float = 0.5      # weight of the KL; 1 - alpha goes to the hard-label cross-entropy
    # DPO (Rafailov et al. 2023): the reference is the model before training (with LoRA: the base, adapters off)
    beta: float = 0.1               # how far the policy may move from the reference
    dpo_sft: float = 0.0            # + this times the chosen answers' cross-entropy per token (RPO): keeps them likely
    make_pairs: bool = False        # dpo from an SFT set: its answer is chosen, the model's own sample rejected (SPIN)
    # generation (the teacher's answers, make_pairs' samples), batched and KV-cached; cached in out_dir
    gen_max_tokens: int = 256
    gen_temperature: float = 0.0    # 0 = greedy
    gen_batch_size: int = 16
    text_field: str = 'text'        # classify: CSV/JSONL columns of the text and its label
    label_field: str = 'label'
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = 'attn'      # attn | mlp | all | a regex over Linear names
    adapter: str = ''               # an adapter.pt to start from (its own LoRA settings; refused on another base);
                                    # with max_iters=0 it is only merged into out_dir/ckpt.pt
    nf4_block: int = 64
    # LoopConfig's keys, with defaults for fine-tuning
    out_dir: str = 'out-finetune'
    block_size: int = 0             # longest example in tokens; 0 = the model's context
    max_iters: int = 200
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    eval_iters: int = 10
    batch_size: int = 8


# ----------------------------------------------------------------------------------------------------------
# instruction data: a prompt template, loss on the response only

ALPACA = ("Below is an instruction that describes a task{paired}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant'}


def conversation(rec, where):
    """The messages of a chat record: 'messages' of {role, content} (OpenAI, SmolTalk) or ShareGPT's
    'conversations' of {from, value}; a trailing turn after the last assistant message is dropped."""
    if 'conversations' in rec:
        turns = rec['conversations']
        msgs = [{'role': SHAREGPT_ROLES.get(t.get('from')), 'content': t.get('value')} if isinstance(t, dict)
                else None for t in turns] if isinstance(turns, list) else None
    else:
        msgs = rec['messages']
    if not (isinstance(msgs, list) and all(isinstance(m, dict) and m.get('role') in ('system', 'user', 'assistant')
                                           and isinstance(m.get('content'), str) for m in msgs)
            and any(m['role'] == 'assistant' for m in msgs)):
        raise UserError(f"{where}: messages must be a list of {{role: system|user|assistant, content}} (or ShareGPT's "
                        f"conversations of {{from: human|gpt|system, value}}) with at least one assistant turn, "
                        f"ending with the assistant's")
    while msgs[-1]['role'] != 'assistant':
        msgs = msgs[:-1]
    return msgs


def sft_segments(rec, template, style, where, ids=False):
    """[(text, learned)] of one record, or with ids=True [(token ids, learned)]: then only the chat template's own
    text writes special tokens (a record's '<|im_end|>' is text, so data cannot teach that typed text ends a
    turn). Chat records: every assistant turn is learned, system and user turns are not. Alpaca/Dolly records
    (instruction, input or context, output or response): the prompt, then the response (in the model's chat
    format with template=chat)."""
    turns = style.encode_turns if ids else style.turns
    if 'messages' in rec or 'conversations' in rec:
        return turns(conversation(rec, where))
    instruction = rec.get('instruction')
    output = rec.get('output', rec.get('response'))
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise UserError(f"{where}: expected 'instruction' and 'output' (or 'response') strings, 'messages' or "
                        f"'conversations'; found keys {sorted(rec)}")
    extra = rec.get('input') or rec.get('context') or ''
    if template == 'chat':
        user = instruction + ('\n\n' + extra if extra else '')
        return turns([{'role': 'user', 'content': user}, {'role': 'assistant', 'content': output}])
    prompt = ALPACA.format(paired=', paired with an input that provides further context' if extra else '',
                           instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else '')
    text = (lambda s: style.tok.encode_parts([s])) if ids else (lambda s: s)  # noqa: E731
    return [(text(prompt), False), (text(output), True)]


def encode_sft(records, tok, block_size, template, style, path):
    """Token ids and targets per example: a target is -100 unless the token it predicts belongs to a reply, so
    only the responses are learned (all of a conversation's assistant turns). Examples longer than block_size + 1
    tokens lose their end; one with nothing left to learn within that is dropped (counted)."""
    eos = tok.eos_id if isinstance(tok.eos_id, int) else (tok.eos_id or [None])[0]
    out, dropped = [], 0
    for n, rec in enumerate(records, 1):
        ids, learn = [], []
        for t, learned in sft_segments(rec, template, style, f"{path} record {n}", ids=True):
            ids, learn = ids + t, learn + [learned] * len(t)
        if eos is not None and not style.template:  # a template writes its own end of turn
            ids, learn = ids + [eos], learn + [True]
        ids, learn = ids[:block_size + 1], learn[:block_size + 1]
        tgt = [ids[j + 1] if learn[j + 1] else -100 for j in range(len(ids) - 1)]  # target j is ids[j + 1]
        if all(t == -100 for t in tgt):
            dropped += 1
            continue
        out.append((ids, tgt))
    return out, dropped


def pack_examples(examples, block_size):
    """Several examples per row, up to block_size + 1 tokens, targets kept, and each token's example number
    (segments), so that attention stays inside an example and positions restart (model.py's positions):
    a packed example computes exactly what it would alone, with fewer pad tokens and faster steps."""
    rows, ids, tgt, seg = [], [], [], []
    for x, y in examples:
        if ids and len(ids) + len(x) > block_size + 1:
            rows.append((ids, tgt, seg))
            ids, tgt, seg = [], [], []
        tgt = tgt + ([-100] if ids else []) + y  # the first token of an example is not predicted from the last
        seg = seg + [seg[-1] + 1 if seg else 0] * len(x)
        ids = ids + x
    return rows + ([(ids, tgt, seg)] if ids else [])


def sft_batch(examples, cfg, split, it, micro, device, pad_id):
    """(x, y) of batch_size examples drawn by (seed, split, it, micro) alone, so a resumed run sees the same
    batches (see pad_rows)."""
    rng = batch_rng(cfg.seed, split, it, micro)
    x, y = pad_rows([examples[i] for i in rng.integers(0, len(examples), cfg.batch_size)], pad_id, cfg.pack)
    return (tuple(t.to(device) for t in x) if cfg.pack else x.to(device)), y.to(device)


def pad_rows(rows, pad_id, segments=False):
    """(x, y) of rows (ids, targets[, segments]) padded on the right to the longest, pad targets -100; the last
    id is not input. With segments x = (ids, segments), the padding its own segment (-1)."""
    T = max(len(r[0]) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, tgt, *rest) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(tgt)] = torch.tensor(tgt)
        seg[i, :len(ids) - 1] = torch.tensor(rest[0][:-1] if rest else [0] * (len(ids) - 1))
    return ((x, seg) if segments else x), y


def split_x(x):
    """(ids, segments or None) of a batch's x, packed or not."""
    return x if isinstance(x, tuple) else (x, None)


class SFTLoss(nn.Module):
    """model(x, y) -> (logits, loss) for train.py's loop, when plain next-token loss is not all: x may be packed
    rows (ids, segments), and with a teacher the loss is alpha * distill_loss + (1 - alpha) * cross-entropy.
    The teacher is held outside the module tree: not trained, not saved, not counted."""

    def __init__(self, model, teacher=None, temperature=2.0, alpha=0.5):
        super().__init__()
        self.model, self.config = model, model.config
        self.teacher = [teacher] if teacher is not None else []
        self.temperature, self.alpha = temperature, alpha

    def forward(self, x, y=None):
        ids, segments = split_x(x)
        logits, ce = self.model(ids, y, segments=segments)
        if y is None or not self.teacher:
            return logits, ce
        with torch.no_grad():
            t_logits, _ = self.teacher[0](ids, segments=segments)
        return logits, self.alpha * distill_loss(logits, t_logits, y, self.temperature) + (1 - self.alpha) * ce


# ----------------------------------------------------------------------------------------------------------
# generation: the teacher's answers (distillation) and the model's own (make_pairs), cached on disk

def prompt_messages(rec, where):
    """The conversation a record's answer replies to: a chat record's turns before its last assistant message,
    or an Alpaca/Dolly record's instruction (and input) as one user message."""
    if 'messages' in rec or 'conversations' in rec:
        return conversation(rec, where)[:-1]
    if not isinstance(rec.get('instruction'), str):
        raise UserError(f"{where}: expected 'instruction' (Alpaca/Dolly), 'messages' or 'conversations'; found keys "
                        f"{sorted(rec)}")
    extra = rec.get('input') or rec.get('context') or ''
    return [{'role': 'user', 'content': rec['instruction'] + ('\n\n' + extra if extra else '')}]


def record_answer(rec, where):
    """The answer a record holds: its last assistant message, or its output (response)."""
    if 'messages' in rec or 'conversations' in rec:
        return conversation(rec, where)[-1]['content']
    answer = rec.get('output', rec.get('response'))
    if not isinstance(answer, str):
        raise UserError(f"{where}: expected 'output' (or 'response'), 'messages' or 'conversations'; found keys "
                        f"{sorted(rec)}")
    return answer


def with_answer(rec, answer):
    """rec with its last assistant message (or its output) replaced by answer."""
    if 'messages' in rec or 'conversations' in rec:
        return {'messages': conversation(rec, 'the record')[:-1] + [{'role': 'assistant', 'content': answer}]}
    return {**{k: v for k, v in rec.items() if k not in ('output', 'response')}, 'output': answer}


def read_answers(path):
    """{key: answer} of a cache file; a line cut short by a crash (the last one) is left out, and regenerated."""
    out = {}
    if os.path.isfile(path):
        with open(path, encoding='utf-8', errors='replace') as f:
            for line in f:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    rec = json.loads(line)
                    out[rec['key']] = rec
    return out


def prompt_ids(rec, template, style, where):
    """The token ids of the prompt a record's answer replies to, in template's format (alpaca, or chat: the
    model's chat format), ready for the answer to be generated."""
    if template == 'alpaca' and 'messages' not in rec and 'conversations' not in rec:
        return sft_segments(rec, 'alpaca', style, where, ids=True)[0][0]
    return style.encode_prompt(prompt_messages(rec, where))


def generate_answers(model, tok, records, path, cfg, source, where, master, template='chat'):
    """The answer model gives to each record's prompt, in template's format (a teacher: its own chat format):
    batched, KV-cached, greedy or sampled (cfg.gen_*). Each batch is appended to path as it finishes, keyed by the generator, the settings
    and the prompt, so a resumed or restarted run generates only what is missing. Returns [{'text',
    'finished'}] in record order (finished: the answer ended before gen_max_tokens). Under torchrun rank 0
    generates and the others wait for its file."""
    style = chat_style(tok)
    prompts = [prompt_ids(r, template, style, f"{where} record {n}") for n, r in enumerate(records, 1)]
    keys = [hashlib.sha256(json.dumps([source, cfg.gen_max_tokens, cfg.gen_temperature, cfg.seed, p]).encode())
            .hexdigest()[:32] for p in prompts]
    done = read_answers(path)
    todo = sorted({i for i, k in enumerate(keys) if k not in done}, key=lambda i: -len(prompts[i]))
    if todo and master:
        print(f"generating {len(todo)} answers with {source} ({len(prompts) - len(todo)} cached in {path})")
        eos = [tok.eos_id] if isinstance(tok.eos_id, int) else list(tok.eos_id or [])
        t0 = time.time()
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path, 'a', encoding='utf-8') as f:
            for b in range(0, len(todo), cfg.gen_batch_size):
                rows = todo[b:b + cfg.gen_batch_size]  # longest first: similar lengths, little padding
                out = model.generate([prompts[i] for i in rows], cfg.gen_max_tokens, temperature=cfg.gen_temperature,
                                     top_k=50 if cfg.gen_temperature else None, eos_id=eos, stop=style.stop or None,
                                     decode=tok.decode, seed=cfg.seed + b)
                for i, ids in zip(rows, out):
                    new = ids[len(prompts[i]):]
                    finished = bool(new) and (new[-1] in eos or any(st in tok.decode(new) for st in style.stop))
                    text = tok.decode([t for t in new if t not in eos])
                    for st in style.stop:
                        text = text.split(st)[0]
                    f.write(json.dumps({'key': keys[i], 'text': text.strip(), 'finished': finished}) + '\n')
                f.flush()
                print(f"  {min(b + cfg.gen_batch_size, len(todo))}/{len(todo)} answers, {time.time() - t0:.0f}s")
        pack_linears(model, pack=False)  # generate packed the CPU weights for inference: unpack for training
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    done = read_answers(path)
    return [done[k] for k in keys]


# ----------------------------------------------------------------------------------------------------------
# distillation: the student learns the teacher's answers (sequence-level, Kim & Rush 2016), its next-token
# distributions (logits, Hinton et al. 2015), or both

def distill_loss(student_logits, teacher_logits, targets, temperature):
    """T^2 * KL(teacher || student) of the distributions softened by T, averaged over the positions with a
    target. T^2 keeps the gradient's scale as T changes. A student vocabulary padded past the teacher's is cut to
    the teacher's."""
    valid = targets != -100
    V = teacher_logits.size(-1)
    s = F.log_softmax(student_logits[..., :V][valid].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def load_teacher(cfg, tok, device):
    """The teacher model (frozen, eval mode, on device) and its tokenizer; for logits, one shared with the student."""
    if not cfg.teacher:
        raise UserError("task=distill needs --teacher=SRC: any model --init_from takes (an out_dir, a GGUF file, "
                        "a Hugging Face folder or name)")
    dtype = resolve_dtype(cfg.dtype, device) if device.startswith('cuda') else 'float32'
    teacher, t_tok = load_model(cfg.teacher, device, dtype, cfg.trust_checkpoint)
    if cfg.distill in ('logits', 'both') and t_tok.identity != tok.identity:
        raise UserError(f"distill={cfg.distill} compares next-token distributions, so the student needs the "
                        f"teacher's tokenizer: prepare its data with `prepare.py --tokenizer_from={cfg.teacher}`, "
                        f"or use --distill=sequence (works across tokenizers)")
    return teacher.requires_grad_(False), t_tok


def distill_records(cfg, records, teacher, t_tok, master):
    """records with the teacher's answers in place of theirs (answers cut off at gen_max_tokens are left out)."""
    path = os.path.join(cfg.out_dir, 'teacher_answers.jsonl')
    answers = generate_answers(teacher, t_tok, records, path, cfg, f"teacher {cfg.teacher}", cfg.data, master)
    out = [with_answer(r, a['text']) for r, a in zip(records, answers) if a['finished'] and a['text']]
    if master:  # the student's training set as records: for DPO's make_pairs, or any other run
        with atomic_write(os.path.join(cfg.out_dir, 'teacher_data.jsonl'), encoding='utf-8') as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in out)
    if master and len(out) < len(records):
        print(f"distill: {len(records) - len(out)} of {len(records)} teacher answers left out (empty, or not "
              f"finished within gen_max_tokens={cfg.gen_max_tokens})")
    if not out:
        raise UserError(f"the teacher finished none of its answers within gen_max_tokens={cfg.gen_max_tokens}: "
                        f"raise it")
    return out


@torch.no_grad()
def sft_evaluate(model, batch, cfg, device, dtype):
    """Task.evaluate of distillation: the student's cross-entropy on held-out answers (the figure to compare with
    an SFT-only student), its token accuracy, and the KL to the teacher when there is one."""
    model.eval()
    ce, kl, correct, counted = 0.0, 0.0, 0, 0
    for k in range(cfg.eval_iters):
        x, y = batch('val', k, 0)
        ids, segments = split_x(x)
        with autocast(device, dtype):
            logits, loss = model.model(ids, y, segments=segments)
            if model.teacher:
                kl += distill_loss(logits, model.teacher[0](ids, segments=segments)[0], y, 1.0).item()
        ce += loss.item()
        valid = y != -100
        correct += (logits.argmax(-1)[valid] == y[valid]).sum().item()
        counted += valid.sum().item()
    model.train()
    out = {'val_loss': ce / cfg.eval_iters, 'val_ppl': math.exp(min(ce / cfg.eval_iters, 50)),
           'val_acc': correct / max(1, counted)}
    return {**out, 'val_kl': kl / cfg.eval_iters} if model.teacher else out


# ----------------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023): raise the policy's log-probability of the chosen answer over the rejected one,
# relative to a frozen reference; loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))) over response tokens

def pair_records(rec, where, template):
    """(chosen record, rejected record) of a preference record: prompt (text or messages) with chosen and rejected
    answers (text, or message lists whose last assistant message is the answer and whose earlier turns are the
    prompt when there is no prompt field). A prompt of text alone, with template=alpaca, makes Alpaca records."""
    def answer(side):
        v = rec.get(side)
        if isinstance(v, str):
            return None, v
        if isinstance(v, list) and v and isinstance(v[-1], dict) and v[-1].get('role') == 'assistant':
            return v[:-1], v[-1].get('content')
        raise UserError(f"{where}: '{side}' must be the answer's text or a message list ending with the assistant's "
                        f"(records are {{prompt, chosen, rejected}})")
    if 'chosen' not in rec or 'rejected' not in rec:
        raise UserError(f"{where} has no 'chosen' and 'rejected' (found keys {sorted(rec)}): DPO reads {{prompt, "
                        f"chosen, rejected}} records; to build them from an SFT set add --make_pairs=True")
    (pc, chosen), (pr, rejected) = answer('chosen'), answer('rejected')
    prompt = rec.get('prompt', pc if pc is not None else pr)
    if not isinstance(prompt, (str, list)) or not all(isinstance(m, str) for m in (chosen, rejected)):
        raise UserError(f"{where}: expected {{prompt, chosen, rejected}} (text or chat messages); found keys "
                        f"{sorted(rec)}")
    if isinstance(prompt, str) and template == 'alpaca':
        return {'instruction': prompt, 'output': chosen}, {'instruction': prompt, 'output': rejected}
    if isinstance(prompt, str):
        prompt = [{'role': 'user', 'content': prompt}]
    return ({'messages': prompt + [{'role': 'assistant', 'content': chosen}]},
            {'messages': prompt + [{'role': 'assistant', 'content': rejected}]})


def last_reply_only(tgt):
    """Targets with only their last learned run kept: the final answer (a DPO response; earlier assistant turns
    belong to the prompt)."""
    j = max(i for i, t in enumerate(tgt) if t != -100)
    while j >= 0 and tgt[j] != -100:
        j -= 1
    return [-100] * (j + 1) + tgt[j + 1:]


def encode_pairs(pairs, tok, cfg, style, where):
    """[(chosen (ids, targets), rejected (ids, targets))] of pairs of SFT records (or preference records, which
    pair_records reads); a pair with a side that does not fit is dropped."""
    out, dropped = [], 0
    for n, pair in enumerate(pairs, 1):
        pair = pair if isinstance(pair, tuple) else pair_records(pair, f"{where} record {n}", cfg.template)
        sides = [encode_sft([r], tok, cfg.block_size, cfg.template, style, f"{where} record {n}")[0] for r in pair]
        if not all(sides):
            dropped += 1
            continue
        out.append(tuple((ids, last_reply_only(tgt)) for (ids, tgt), in sides))
    return out, dropped


def dpo_batch(pairs, cfg, split, it, micro, device, pad_id):
    """(x, y) of batch_size pairs drawn by (seed, split, it, micro): rows 0..B-1 the chosen answers, B..2B-1 the
    rejected ones, padded on the right."""
    rng = batch_rng(cfg.seed, split, it, micro)
    chosen = [pairs[i] for i in rng.integers(0, len(pairs), cfg.batch_size)]
    x, y = pad_rows([c for c, _ in chosen] + [r for _, r in chosen], pad_id)
    return x.to(device), y.to(device)


def sequence_logps(logits, targets):
    """(B,) sums of the log-probabilities of each row's targets (positions with -100 do not count)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(-1)


def dpo_loss(policy_logps, reference_logps, beta):
    """(loss, chosen rewards, rejected rewards) of 2B rows of summed log-probabilities, chosen ones first; a
    reward is beta * (policy - reference) log-probability."""
    B = policy_logps.size(0) // 2
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards[:B], rewards[B:]
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


class DPOLoss(nn.Module):
    """model(x, y) -> (logits, loss) for train.py's loop. The reference is the model with its adapters off
    (LoRA, QLoRA: the same weights, no copy) or, for mode=full, a frozen copy made before training."""

    def __init__(self, model, beta, reference=None, sft_weight=0.0):
        super().__init__()
        self.model, self.config, self.beta, self.sft_weight = model, model.config, beta, sft_weight
        self.reference = [reference] if reference is not None else []  # outside the module tree: not trained or saved

    def reference_logps(self, x, y):
        with torch.no_grad():
            if self.reference:
                return sequence_logps(self.reference[0](x)[0], y)
            with adapters_off(self.model):
                return sequence_logps(self.model(x)[0], y)

    def objective(self, x, y):
        """(loss, policy log-probabilities, chosen rewards, rejected rewards): DPO's loss, plus sft_weight times the
        chosen answers' cross-entropy per token (RPO, Pang et al. 2024), which keeps them likely: DPO alone may
        lower both answers' probabilities and wreck a small model's text."""
        policy = sequence_logps(self.model(x)[0], y)
        loss, chosen, rejected = dpo_loss(policy, self.reference_logps(x, y), self.beta)
        if self.sft_weight:
            B = policy.size(0) // 2
            loss = loss - self.sft_weight * policy[:B].sum() / (y[:B] != -100).sum().clamp(min=1)
        return loss, policy, chosen, rejected

    def forward(self, x, y=None):
        if y is None:
            return self.model(x)[0], None
        return None, self.objective(x, y)[0]


@torch.no_grad()
def dpo_evaluate(model, batch, cfg, device, dtype):
    """Task.evaluate of DPO on held-out pairs: loss, reward accuracy (chosen reward above rejected; a tie, as
    before any training, counts half), reward margin, and the policy's mean log-probability of chosen and
    rejected answers."""
    model.eval()
    sums = dict.fromkeys(('val_loss', 'val_reward_acc', 'val_reward_margin', 'val_chosen_logp',
                          'val_rejected_logp'), 0.0)
    for k in range(cfg.eval_iters):
        x, y = batch('val', k, 0)
        with autocast(device, dtype):
            loss, policy, chosen, rejected = model.objective(x, y)
        margin = chosen - rejected
        B = margin.size(0)
        for key, v in (('val_loss', loss), ('val_reward_acc', ((margin > 0).float() + 0.5 * (margin == 0)).mean()),
                       ('val_reward_margin', margin.mean()), ('val_chosen_logp', policy[:B].mean()),
                       ('val_rejected_logp', policy[B:].mean())):
            sums[key] += v.item()
    model.train()
    return {k: v / cfg.eval_iters for k, v in sums.items()}


def dpo_data(cfg, model, tok, master):
    """Train and held-out preference pairs from cfg.data, or with make_pairs built from an SFT set: the set's
    answer is chosen, the model's own sampled answer rejected (SPIN, Chen et al. 2024)."""
    records = read_records(cfg)
    style = chat_style(tok)
    if cfg.make_pairs:
        path = os.path.join(cfg.out_dir, 'own_answers.jsonl')
        own = generate_answers(model, tok, records, path, cfg, f"model {cfg.init_from}", cfg.data, master,
                               cfg.template)
        records = [(r, with_answer(r, a['text'])) for r, a in zip(records, own)  # (chosen, rejected)
                   if a['text'].strip() != record_answer(r, cfg.data).strip()]
        if master:
            print(f"make_pairs: {len(records)} pairs (the set's answer chosen, the model's own rejected; {path})")
    train_recs, val_recs = split_records(cfg, records)
    val, dropped_v = encode_pairs(val_recs, tok, cfg, style, cfg.val_data or cfg.data)
    train_pairs, dropped_t = encode_pairs(train_recs, tok, cfg, style, cfg.data)
    if not train_pairs:
        raise UserError(f"{cfg.data}: no preference pairs fit in block_size={cfg.block_size} tokens")
    if master:
        print(f"dpo: {len(train_pairs)} train / {len(val)} held-out pairs, beta {cfg.beta}"
              + (f"; {dropped_t + dropped_v} dropped: the prompt alone fills the context" if dropped_t + dropped_v else ''))
    return train_pairs, val or train_pairs


# ----------------------------------------------------------------------------------------------------------
# the task train.train runs, and what is saved at each checkpoint

def finetune_task(cfg, ckpt, device, master):
    """train.train's Task: the base model with adapters (or all weights trainable), its tokenizer, the data.
    (ckpt, this run's state on --resume, is train()'s to load: the model is built the same either way.)"""
    model, tok = load_model(cfg.init_from, 'cpu', 'float32', cfg.trust_checkpoint)
    cfg.block_size = min(cfg.block_size or model.config.block_size, model.config.block_size)
    bert = model.config.model_type == 'bert'
    if bert and cfg.task != 'classify':
        raise UserError(f"task={cfg.task} needs a gpt or llama model; '{cfg.init_from}' is bert: use --task=classify")
    meta = {'tokenizer': tok.meta, 'vocab_size': model.config.vocab_size}
    if cfg.task == 'classify':
        examples, labels = classify_data(cfg, tok)
        meta['labels'] = labels
        if model.classifier is None or model.classifier.out_features != len(labels):  # a new head
            torch.manual_seed(cfg.seed)
            model.classifier = nn.Linear(model.config.n_embd, len(labels), bias=bert)  # decoders' has no bias
            model.config.num_labels = len(labels)
        if cfg.mode == 'full':  # heads that classification never uses get no gradient: DDP would wait for one
            for n, p in model.named_parameters():
                p.requires_grad_(not n.startswith(('mlm_', 'lm_head.')))
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.task == 'dpo':  # before the adapters: make_pairs samples the model as it is, and full's reference copies it
        train_pairs, val_pairs = dpo_data(cfg, model.to(device), tok, master)
        reference = None if cfg.mode != 'full' else \
            frozen_to(copy.deepcopy(model).requires_grad_(False).eval(), dtype)  # LoRA's: its base, adapters off
    fingerprint = base_fingerprint(model)  # before the adapters: what an adapter.pt is checked against
    merged_before = add_adapters(model, cfg, dtype)
    trainable, total = count_params(model)
    if master:
        print(f"{cfg.mode}: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")

    pad = tok.eos_id if isinstance(tok.eos_id, int) else (tok.eos_id or [0])[0]
    evaluate = None
    if cfg.task in ('sft', 'distill'):
        teacher = None
        records = read_records(cfg)
        if cfg.task == 'distill':
            teacher, t_tok = load_teacher(cfg, tok, device)
            if cfg.distill in ('sequence', 'both'):
                records = distill_records(cfg, records, teacher, t_tok, master)
            if cfg.distill == 'sequence':
                teacher = None  # its answers are all it gives: free its memory before training
        train_ex, val_ex = sft_data(cfg, records, tok, master)
        if cfg.pack or teacher is not None:
            model = SFTLoss(model, teacher, cfg.distill_temperature, cfg.distill_alpha)
        if cfg.task == 'distill':
            evaluate = lambda m: sft_evaluate(task.model if isinstance(task.model, SFTLoss)  # noqa: E731
                                              else SFTLoss(task.model), batch, cfg, device, dtype)
        batch = lambda split, it, micro: sft_batch(train_ex if split == 'train' else val_ex, cfg, split,  # noqa: E731
                                                   it, micro, device, pad)
    elif cfg.task == 'dpo':
        model = DPOLoss(model, cfg.beta, reference, cfg.dpo_sft)
        batch = lambda split, it, micro: dpo_batch(train_pairs if split == 'train' else val_pairs, cfg, split,  # noqa: E731
                                                   it, micro, device, pad)
        evaluate = lambda m: dpo_evaluate(task.model, batch, cfg, device, dtype)  # noqa: E731
    elif cfg.task == 'lm':
        data_meta, data = load_data(cfg.data_dir)
        if meta_tokenizer(data_meta).identity != tok.identity:
            raise UserError(f"'{cfg.data_dir}' was not tokenized with this model's tokenizer: prepare it with "
                            f"the same tokenizer (e.g. --tokenizer=gpt2 for GPT-2)")
        # get_batch reads the windows' shape and kind from a config: next-token ones (BERT is refused above)
        windows = SimpleNamespace(seed=cfg.seed, batch_size=cfg.batch_size, block_size=cfg.block_size, model_type='gpt')
        batch = lambda split, it, micro: get_batch(data, windows, split, it, micro, device)  # noqa: E731
    elif cfg.task == 'classify':
        batch = lambda split, it, micro: classify_batch(examples[split], cfg, split, it, micro, device)  # noqa: E731
        model = ClassifierLoss(model)
    else:
        raise UserError(f"task must be sft, distill, dpo, lm or classify, not '{cfg.task}'")
    task = Task(model=model, model_args=asdict(model.config), meta=meta, batch=batch, evaluate=evaluate,
                on_save=lambda m: save_finetuned(m, cfg, meta, fingerprint, merged_before))
    return task


def add_adapters(model, cfg, dtype):
    """LoRA/QLoRA adapters on model, in place: new ones from cfg, or cfg.adapter's with its own settings; the
    frozen base then in the autocast dtype. Nothing for mode=full. Returns the ids of the adapters merged into the
    base already (an adapter is never merged twice)."""
    if cfg.mode not in ('full', 'lora', 'qlora'):
        raise UserError(f"mode must be full, lora or qlora, not '{cfg.mode}'")
    adapter = read_adapter(cfg.adapter, cfg.trust_checkpoint) if cfg.adapter else None
    merged_before = merged_adapters(cfg.init_from, cfg.trust_checkpoint)
    if adapter and adapter.get('id') in merged_before:
        raise UserError(f"{cfg.adapter} is already merged into {cfg.init_from}: pass the base it was trained on "
                        f"(--init_from={adapter['config']['init_from']})")
    if cfg.mode == 'full':
        if adapter:
            raise UserError("--adapter needs --mode=lora or qlora (full fine-tuning has no adapters)")
        return merged_before
    torch.manual_seed(cfg.seed)  # the adapters' initialisation, the same in every run
    bert = model.config.model_type == 'bert'
    extra = (('pooler', 'classifier') if bert else ('classifier',)) if cfg.task == 'classify' else ()
    lc = adapter['lora_config'] if adapter else dict(
        target=cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, qlora=cfg.mode == 'qlora',
        block_size=cfg.nf4_block, train_extra=extra)
    try:
        apply_lora(model, lc['target'], r=lc['r'], alpha=lc['alpha'], dropout=cfg.lora_dropout,
                   qlora=lc['qlora'], block_size=lc['block_size'], train_extra=lc['train_extra'])
        if adapter:
            load_lora(model, adapter['lora'], adapter['fingerprint'])
    except ValueError as e:
        raise UserError(f"{cfg.adapter}: {e}" if adapter else str(e)) from None
    frozen_to(model, dtype)
    return merged_before


def save_finetuned(model, cfg, meta, fingerprint, merged_before):
    """Task.on_save: out_dir/adapter.pt (the adapters, their settings, the base's fingerprint) and out_dir/ckpt.pt,
    the merged model that sample.py loads like any checkpoint."""
    model = getattr(model, 'model', model)  # the model inside ClassifierLoss
    os.makedirs(cfg.out_dir, exist_ok=True)
    merged, ids = model, merged_before
    if cfg.mode != 'full':
        lora = lora_state_dict(model)
        ids = merged_before + [adapter_id(lora)]
        save_checkpoint({'lora': lora, 'lora_config': model.lora_config, 'fingerprint': fingerprint, 'id': ids[-1],
                         'config': asdict(cfg)}, os.path.join(cfg.out_dir, 'adapter.pt'))
        merged = copy.deepcopy(model)
        merge_lora(merged)  # in place, on the copy: training goes on with the adapters
    save_checkpoint({'model': merged.state_dict(), 'model_args': asdict(merged.config), 'meta': meta,
                     'merged_adapters': ids, 'config': asdict(cfg)}, os.path.join(cfg.out_dir, 'ckpt.pt'))


def read_adapter(path, trust=False):
    """An adapter.pt written by a LoRA/QLoRA run: tensors, settings and the base's fingerprint."""
    state = load_checkpoint(path, trust=trust)
    if not isinstance(state, dict) or not {'lora', 'lora_config', 'fingerprint'} <= set(state):
        raise UserError(f"'{path}' is not an adapter.pt (no lora, lora_config and fingerprint): pass --init_from "
                        f"for full checkpoints")
    return state


def adapter_id(lora):
    """A short hash of the adapter's tensors: merged checkpoints list the ids merged into them."""
    h = hashlib.sha256()
    for name in sorted(lora):
        h.update(name.encode() + lora[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def merged_adapters(init_from, trust=False):
    """Ids of the adapters already merged into init_from (a finetune_lora.py out_dir), so none is merged twice."""
    path = os.path.join(init_from, 'ckpt.pt')
    if not os.path.isfile(path):
        return []
    ckpt = load_checkpoint(path, trust=trust, mmap=True)
    return ckpt.get('merged_adapters', []) if isinstance(ckpt, dict) else []


def frozen_to(model, dtype):
    """Keep the frozen base weights in the autocast dtype (bf16/fp16): they get no updates, so fp32 master copies
    buy nothing, and autocast then need not keep casted copies of them either. About half of LoRA's memory."""
    if dtype in ('bfloat16', 'float16'):
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(getattr(torch, dtype))
    return model


# ----------------------------------------------------------------------------------------------------------
# classification: text and label columns, BERT's pooled [CLS] position and classifier

class ClassifierLoss(nn.Module):
    """model(x, labels) -> (class logits, loss) for train.py's loop; x holds -1 where a row is padding."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x, labels=None):
        return self.model.classify(x.clamp(min=0), labels, attention_mask=x >= 0)


def classify_data(cfg, tok):
    """{'train': [(ids, label)], 'val': [...]} and the sorted label names, from a CSV or JSON/JSONL file."""
    if cfg.data.endswith('.csv'):
        if not os.path.isfile(cfg.data):
            raise UserError(f"data file '{cfg.data}' not found")
        with open(cfg.data, newline='', encoding='utf-8', errors='replace') as f:
            records = list(csv.DictReader(f))
    else:
        records = read_json_records(cfg.data, '--data')
    for n, r in enumerate(records, 1):
        if cfg.text_field not in r or cfg.label_field not in r:
            raise UserError(f"{cfg.data} record {n} has no '{cfg.text_field}' and '{cfg.label_field}' (found "
                            f"{sorted(r)}): set --text_field and --label_field")
    labels = sorted({str(r[cfg.label_field]) for r in records})
    if len(labels) < 2:
        raise UserError(f"{cfg.data}: the label column '{cfg.label_field}' has one class ({labels}); "
                        f"classification needs at least two")
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_val = max(1, int(len(records) * cfg.val_fraction))
    ex = [(tok.encode(str(records[i][cfg.text_field]))[:cfg.block_size] or [0],
           labels.index(str(records[i][cfg.label_field]))) for i in order]
    return {'val': ex[:n_val], 'train': ex[n_val:] or ex[:n_val]}, labels


def classify_batch(examples, cfg, split, it, micro, device):
    """(x, labels): batch_size examples drawn by (seed, split, it, micro), x padded with -1 on the right."""
    rng = batch_rng(cfg.seed, split, it, micro)
    chosen = [examples[i] for i in rng.integers(0, len(examples), cfg.batch_size)]
    x = torch.full((cfg.batch_size, max(len(ids) for ids, _ in chosen)), -1, dtype=torch.long)
    for i, (ids, _) in enumerate(chosen):
        x[i, :len(ids)] = torch.tensor(ids)
    return x.to(device), torch.tensor([label for _, label in chosen], device=device)


@torch.no_grad()
def classify_report(model, examples, labels, device):
    """Accuracy and macro-F1 (F1 per class, averaged, so rare classes count as much as common ones)."""
    model.eval()
    pred = [model.classify(torch.tensor([ids], device=device))[0].argmax(-1).item() for ids, _ in examples]
    gold = [label for _, label in examples]
    f1 = []
    for c in range(len(labels)):
        tp = sum(p == g == c for p, g in zip(pred, gold))
        fp, fn = sum(p == c != g for p, g in zip(pred, gold)), sum(g == c != p for p, g in zip(pred, gold))
        f1.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {'accuracy': sum(p == g for p, g in zip(pred, gold)) / len(gold), 'macro_f1': sum(f1) / len(f1),
            'n': len(gold)}


def read_records(cfg):
    """The records of cfg.data (its first cfg.limit, if set)."""
    records = read_json_records(cfg.data, '--data')
    return records[:cfg.limit] if cfg.limit else records


def split_records(cfg, records):
    """(train, held-out) records: a seeded shuffle's val_fraction held out, or with val_data all of records to
    train on and that file's to hold out."""
    if cfg.val_data:
        return records, read_json_records(cfg.val_data, '--val_data')
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_val = max(1, int(len(records) * cfg.val_fraction)) if len(records) > 1 else 0
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def sft_data(cfg, records, tok, master):
    """Train and held-out examples of records (cfg.data's), split by split_records."""
    style = chat_style(tok)
    train_recs, val_recs = split_records(cfg, records)
    val, dropped_v = encode_sft(val_recs, tok, cfg.block_size, cfg.template, style, cfg.val_data or cfg.data)
    train, dropped_t = encode_sft(train_recs, tok, cfg.block_size, cfg.template, style, cfg.data)
    if not train:
        raise UserError(f"{cfg.data}: no training examples fit in block_size={cfg.block_size} tokens")
    if master:
        print(f"sft: {len(train)} train / {len(val)} held-out examples ({cfg.template} template)"
              + (f"; {dropped_t + dropped_v} dropped: the prompt alone fills the context" if dropped_t + dropped_v else ''))
    if cfg.pack:
        train = pack_examples(train, cfg.block_size)
    return train, val or train


def main(argv):
    cfg = parse_config(FinetuneConfig, argv)
    check_ranges(cfg, positive=('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters',
                                'log_interval', 'lora_r', 'nf4_block', 'gen_max_tokens', 'gen_batch_size'),
                 non_negative=('learning_rate', 'min_lr', 'max_iters', 'warmup_iters', 'lr_decay_iters', 'block_size', 'limit',
                               'weight_decay', 'grad_clip', 'patience', 'num_threads', 'lora_alpha',
                               'gen_temperature'),
                 fractions=('lora_dropout', 'beta1', 'beta2'))
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), not {cfg.val_fraction!r}")
    writable_dir(cfg.out_dir, 'out_dir')
    try:  # before the model loads
        re.compile(TARGETS.get(cfg.lora_targets, cfg.lora_targets))
    except re.error as e:
        raise UserError(f"lora_targets={cfg.lora_targets!r} is not attn, mlp, all or a valid regex ({e})") from None
    if cfg.task not in ('sft', 'distill', 'dpo', 'lm', 'classify'):  # before the model loads
        raise UserError(f"task must be sft, distill, dpo, lm or classify, not '{cfg.task}'")
    if cfg.task in ('sft', 'distill') and not cfg.data:
        raise UserError(f"task={cfg.task} needs --data=FILE.json or .jsonl of {{instruction, input, output}} or "
                        f"{{messages}} records")
    if cfg.task == 'dpo' and not cfg.data:
        raise UserError("task=dpo needs --data=FILE.json or .jsonl of {prompt, chosen, rejected} records (or an SFT "
                        "set with --make_pairs=True)")
    if cfg.distill not in ('sequence', 'logits', 'both'):
        raise UserError(f"distill must be sequence, logits or both, not '{cfg.distill}'")
    if cfg.teacher and cfg.task != 'distill':
        raise UserError(f"--teacher is for --task=distill (this is task={cfg.task})")
    if cfg.make_pairs and cfg.task != 'dpo':
        raise UserError(f"--make_pairs builds DPO pairs: it needs --task=dpo (this is task={cfg.task})")
    if cfg.dpo_sft < 0:
        raise UserError(f"dpo_sft must be >= 0, not {cfg.dpo_sft!r}")
    if not 0 <= cfg.distill_alpha <= 1:
        raise UserError(f"distill_alpha must be in [0, 1], not {cfg.distill_alpha!r}")
    if cfg.distill_temperature <= 0 or cfg.beta <= 0:
        raise UserError("distill_temperature and beta must be > 0")
    if cfg.fsdp:
        raise UserError("finetune_lora.py runs single-process or DDP (torchrun); fsdp=True is for train.py")
    if cfg.task == 'classify' and not cfg.data:
        raise UserError("task=classify needs --data=FILE.csv or .jsonl with text and label columns")
    if cfg.adapter and cfg.max_iters == 0:  # merge only: base + adapter -> out_dir/ckpt.pt
        task = finetune_task(cfg, None, 'cpu', True)
        task.on_save(task.model)
        print(f"merged {cfg.adapter} into {cfg.init_from}: wrote {os.path.join(cfg.out_dir, 'ckpt.pt')}")
    else:
        train(cfg, finetune_task, resume=cfg.resume, state_file=cfg.state_file)
    if cfg.task == 'classify' and not cfg.dry_run:  # the held-out figures of the saved (merged) model
        model, tok = load_model(cfg.out_dir, resolve_device(cfg.device), 'float32', cfg.trust_checkpoint)
        examples, labels = classify_data(cfg, tok)
        report = classify_report(model, examples['val'], labels, model.classifier.weight.device)
        print(f"held-out: accuracy {report['accuracy']:.2%}, macro-F1 {report['macro_f1']:.3f} over {report['n']} examples")
        with open(os.path.join(cfg.out_dir, 'eval.json'), 'w') as f:
            json.dump({**report, 'labels': labels}, f, indent=2)


if __name__ == '__main__':
    run_cli(main)

"""
LoRA and QLoRA fine-tuning. (module docstring placeholder: the training driver and CLI come below the LoRA section)
"""
import dataclasses
import math
import re

import torch
import torch.nn as nn
from torch.nn import functional as F

from quantize import NF4Linear

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

    def forward(self, x):
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = F.linear(self.dropout(x), A)                        # (..., in) -> (..., r)
        return self.base(x) + F.linear(h, B) * self.scaling  # (..., r) -> (..., out)

    def delta_weight(self):
        """The fp32 (out, in) update scaling * B @ A that merging adds to the base weight."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self):
        """A plain nn.Linear with weight W + scaling * B @ A: the same outputs with one matmul instead of three.
        An NF4 base is dequantized and the merged layer is fp32; a plain base keeps its dtype."""
        if isinstance(self.base, NF4Linear):
            lin = self.base.to_linear()
        else:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                            device=self.base.weight.device, dtype=self.base.weight.dtype)
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
BLOCK_LINEAR = re.compile(r'(^|\.)h\.\d+\.')  # Linears inside the transformer blocks: the ones QLoRA quantizes


def _linears(model):
    # (name, module) of every linear layer, quantized or not
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]


def _replace(model, name, new):
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model, target='attn', r=8, alpha=16, dropout=0.0, qlora=False, block_size=64, train_extra=()):
    """Freeze model and wrap the Linears whose names match target (a TARGETS key or a regex) in LoRALinear.
    qlora: every Linear of the transformer blocks (targets or not) is first stored as NF4 (block_size weights per
    scale); embeddings, output head and classifier stay in full precision. train_extra: regexes of parameter
    names to keep trainable too (e.g. 'classifier' for a classification head). Returns the wrapped names and
    records the settings in model.lora_config."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: apply_lora once per model")
    pattern = TARGETS.get(target, target)
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
        _replace(model, name, lin)
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
        _replace(model, name, model.get_submodule(name).merge())
    if dequantize:
        for name, m in _linears(model):
            if isinstance(m, NF4Linear):
                _replace(model, name, m.to_linear())
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
        idx = torch.linspace(0, flat.numel() - 1, 8).long()
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

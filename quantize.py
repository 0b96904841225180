"""
Quantization and pruning: smaller weights, faster decoding, and what each costs in perplexity.

    python quantize.py --init_from=out-shakespeare-char --mode=int8 --eval_data=data/shakespeare_char
    python quantize.py --init_from=gpt2 --mode=int4 --group_size=64 --out_dir=out-gpt2-int4 --report=int4.json
    python quantize.py --init_from=out-shakespeare-char --mode=prune --sparsity=0.5 --prune_pattern=2:4
    python sample.py --init_from=out-gpt2-int4           # a quantized checkpoint loads like any other
    python quantize.py --init_from=out-x --mode=gguf --gguf_type=q8_0 --out=model.gguf   # for llama.cpp, Ollama

Weight-only schemes swap modules in for nn.Linear (and nn.Embedding) without the model code knowing:
    Int8Linear   int8 per output channel, symmetric                  ~1 byte per weight
                 (scheme 'dynamic': the same weights, activations quantized to int8 on the fly too)
    Int4Linear   4-bit group-wise (32/64/128), asymmetric, 2 per byte  ~0.56 bytes at group 64
    NF4Linear    QLoRA's 4-bit NormalFloat, block 64, double-quantized  ~0.52 bytes
quantize_model(model, 'int8') converts a model in place; save_quantized / load_quantized keep the packed
tensors, so the file is small too. prune() zeroes weights by magnitude, unstructured or 2:4.

The library part of this file needs only torch, numpy and model.py, so the two files can be copied into
another project; the command line at the bottom uses the rest of the repo.
"""
import dataclasses
import os
import re
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import ModelConfig, build_model

# ----------------------------------------------------------------------------------------------------------
# NF4

# QLoRA's 16 NormalFloat4 levels: quantiles of N(0, 1) scaled to [-1, 1], 8 positive and 7 negative so that 0
# and +-1 are exact (normal weights cluster near zero, so the levels do too). The published float32 constants;
# tests/test_lora.py checks that they are the quantiles.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def pack_4bit(codes):
    """Two 4-bit codes per byte, the first in the high nibble: uint8 (n,) with n even -> (n/2,). [1, 2] -> [0x12]"""
    codes = codes.to(torch.uint8).view(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1]


def unpack_4bit(packed):
    """The inverse of pack_4bit: uint8 (n/2,) -> (n,) codes in 0..15. [0x12] -> [1, 2]"""
    return torch.stack((packed >> 4, packed & 15), dim=1).view(-1)


def _blocks(x, block_size):
    # flat x zero-padded to whole blocks: (n_blocks, block_size); zeros cost nothing to quantize
    x = x.reshape(-1)
    pad = -x.numel() % block_size
    return F.pad(x, (0, pad)).view(-1, block_size)


def quantize_scales(absmax, dq_block=256):
    """Double quantization: the (n_blocks,) fp32 scales as int8 in blocks of dq_block with one fp32 scale per
    block, after subtracting their mean (scales are all positive; centred, int8's sign bit is not wasted).
    Saves ~3.5 bits per block of weights, i.e. ~0.37 bits per weight at block_size 64."""
    mean = absmax.mean()
    c = _blocks(absmax - mean, dq_block)                       # (n_dq_blocks, dq_block)
    scale = c.abs().amax(dim=1) / 127                          # (n_dq_blocks,)
    q = torch.round(c / scale.clamp_min(1e-12)[:, None]).to(torch.int8)
    return q.view(-1)[:absmax.numel()], scale, mean


def dequantize_scales(q, scale, mean, dq_block=256):
    """The fp32 block scales (n_blocks,) from quantize_scales' int8 codes, per-block scales and mean."""
    return (_blocks(q.float(), dq_block) * scale[:, None]).view(-1)[:q.numel()] + mean


def nf4_quantize(w, block_size=64, double_quant=True, dq_block=256):
    """Weight w (any shape) as a dict of tensors: 'codes' uint8 (ceil(n/block_size)*block_size/2,), two 4-bit level
    indices per byte; the per-block absmax scales, as 'absmax' fp32 (n_blocks,) or with double_quant as 'absmax_q'
    int8, 'absmax_scale' fp32 (ceil(n_blocks/dq_block),) and 'absmax_mean' fp32 (); plus 'shape', 'block_size'
    and 'dq_block'. Each weight becomes the level nearest to w / absmax of its block."""
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    blocks = _blocks(w.detach().float(), block_size)          # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)                          # (n_blocks,)
    x = blocks / absmax.clamp_min(1e-12)[:, None]              # in [-1, 1]; an all-zero block stays zero
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]).to(w.device) / 2  # nearest level = which gap between midpoints
    q = dict(codes=pack_4bit(torch.bucketize(x, mids).view(-1)), shape=tuple(w.shape), block_size=block_size,
             dq_block=dq_block)
    if double_quant:
        q['absmax_q'], q['absmax_scale'], q['absmax_mean'] = quantize_scales(absmax, dq_block)
    else:
        q['absmax'] = absmax
    return q


def nf4_absmax(q):
    """The fp32 per-block scales (n_blocks,) of a quantized weight, whether double-quantized or not."""
    if 'absmax' in q:
        return q['absmax']
    return dequantize_scales(q['absmax_q'], q['absmax_scale'], q['absmax_mean'], q['dq_block'])


def nf4_dequantize(q, dtype=torch.float32):
    """The weight that nf4_quantize stored, in its shape and dtype (computed in fp32, then cast)."""
    levels = NF4_LEVELS.to(q['codes'].device)[unpack_4bit(q['codes']).long()]  # (n_padded,)
    w = levels.view(-1, q['block_size']) * nf4_absmax(q)[:, None]              # (n_blocks, block_size)
    n = torch.Size(q['shape']).numel()
    return w.view(-1)[:n].view(q['shape']).to(dtype)


_NF4_TENSORS = ('codes', 'absmax', 'absmax_q', 'absmax_scale', 'absmax_mean')


class QuantLinear(nn.Module):
    """What the quantized linears share. Subclasses keep the weight in buffers (so the state_dict holds the small
    tensors) and define dequantized_weight(dtype) and weight_bytes(); forward may use a faster kernel. The bias
    stays in full precision. Nothing here is trained: gradients flow through to the input only."""

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the scales (nor the bias): keep every tensor's dtype here and
        # only follow device moves; forward casts to the input's dtype instead
        def keep_dtype(t):
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)
        return super()._apply(keep_dtype, recurse)

    def rows(self, idx, dtype):
        """Rows idx of the (out, in) weight in dtype: the lookup of an embedding table stored this way."""
        return self.dequantized_weight(dtype)[idx]

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def to_linear(self):
        """A plain fp32 nn.Linear with the dequantized weight (to export or to merge into)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=next(self.buffers()).device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def weight_bytes(self):
        """Bytes the quantized weight takes: codes and scales (not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _bias(self, bias):
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class NF4Linear(QuantLinear):
    """Swaps in for a frozen nn.Linear: the weight is kept as NF4 codes and quantized scales and dequantized in
    each forward to the input's dtype."""

    def __init__(self, q, bias=None):
        super().__init__()
        self.out_features, self.in_features = q['shape']
        self.block_size, self.dq_block = q['block_size'], q['dq_block']
        for k in _NF4_TENSORS:
            if k in q:
                self.register_buffer(k, q[k])
        self._bias(bias)

    @classmethod
    def from_linear(cls, lin, block_size=64, double_quant=True, dq_block=256):
        """An NF4Linear holding lin's weight quantized and its bias as it is."""
        return cls(nf4_quantize(lin.weight, block_size, double_quant, dq_block), lin.bias)

    def quantized(self):
        """The dict nf4_dequantize takes, pointing at this module's buffers."""
        q = {k: getattr(self, k) for k in _NF4_TENSORS if hasattr(self, k)}
        return dict(q, shape=(self.out_features, self.in_features), block_size=self.block_size, dq_block=self.dq_block)

    def dequantized_weight(self, dtype=torch.float32):
        """The (out, in) weight in dtype."""
        return nf4_dequantize(self.quantized(), dtype)

    def rows(self, idx, dtype):
        K, bs = self.in_features, self.block_size
        if K % bs:  # blocks straddle rows
            return super().rows(idx, dtype)
        codes = unpack_4bit(self.codes.view(self.out_features, K // 2)[idx].reshape(-1))  # (n * K,)
        scales = nf4_absmax(self.quantized()).view(self.out_features, K // bs)[idx]        # (..., K / bs)
        w = NF4_LEVELS.to(codes.device)[codes.long()].view(*scales.shape[:-1], K // bs, bs) * scales[..., None]
        return w.view(*idx.shape, K).to(dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"block_size={self.block_size}, double_quant={hasattr(self, 'absmax_q')}"


# ----------------------------------------------------------------------------------------------------------
# int8 and int4


def int8_quantize(w):
    """Symmetric per-output-channel int8: w (out, in) -> q int8 (out, in), scale fp32 (out,), w ~= q * scale.
    Each row's largest |w| maps to 127, so the rounding error is at most scale / 2 = absmax / 254 per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(QuantLinear):
    """int8 weight, fp32 scale per output row. Decoding reads a quarter of fp32's bytes per token."""

    def __init__(self, q, scale, bias=None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer('weight_q', q)
        self.register_buffer('scale', scale)
        self._bias(bias)
        self.dynamic, self.fbgemm = False, None  # dynamic: int8 activations too (quantize_model's 'dynamic')

    @classmethod
    def from_linear(cls, lin):
        return cls(*int8_quantize(lin.weight), lin.bias)

    def dequantized_weight(self, dtype=torch.float32):
        return (self.weight_q.float() * self.scale[:, None]).to(dtype)

    def rows(self, idx, dtype):
        return (self.weight_q[idx].float() * self.scale[idx, None]).to(dtype)

    def unit_scale(self):  # ones for the kernel's bf16 scale argument, made once (not saved)
        if getattr(self, '_unit', None) is None or self._unit.device != self.weight_q.device:
            self._unit = torch.ones(self.out_features, dtype=torch.bfloat16, device=self.weight_q.device)
        return self._unit

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.dynamic and x.device.type == 'cpu':
            return self._dynamic(x)
        if x.device.type == 'cpu' and hasattr(torch.ops.aten, '_weight_int8pack_mm'):
            # ATen's int8-weight matmul reads the int8 matrix as it is: 3-4x faster than fp32 when decoding. It
            # takes bf16 activations (its fp32 path is ~10x slower), so the input is rounded to bf16 here. The
            # scales are applied after, in fp32: rounded to bf16 they would shift whole rows by up to 0.4%, which
            # cost SmolLM2-135M +0.6% perplexity where this costs +0.33% (fp32 weights would give +0.30%).
            bf16 = torch.bfloat16
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(bf16), self.weight_q,
                                                   self.unit_scale()).view(*x.shape[:-1], -1)
            y = (y.float() * self.scale.float()).to(x.dtype)
        else:  # x @ (q * s)^T = (x @ q^T) * s: the scale is applied to the output
            y = F.linear(x, self.weight_q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if bias is None else y + bias

    def _dynamic(self, x):
        # dynamic activation quantization (fbgemm): each input row is quantized to int8 on the fly and the
        # product runs in int8 with int32 sums: a little faster than weight-only int8 on CPU, ~1-2% output error
        if self.fbgemm is None:
            with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; the kernel is current
                warnings.simplefilter('ignore', UserWarning)
                q = torch._make_per_channel_quantized_tensor(self.weight_q, self.scale.double(),
                                                             torch.zeros_like(self.scale, dtype=torch.long), 0)
            self.fbgemm = torch.ops.quantized.linear_prepack(q, None if self.bias is None else self.bias.float())
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.fbgemm, True)
        return y.view(*x.shape[:-1], -1).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dynamic={self.dynamic}"


def int4_quantize(w, group_size=64):
    """Asymmetric 4-bit per group of group_size input columns: w (out, in) -> codes uint8 (out, in) in 0..15,
    scales and zeros fp16 (out, in / group_size), w ~= codes * scale + zero. min..max of each group spans the 16
    levels (error at most scale / 2); scale and zero are rounded to fp16 first so that the codes fit them."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}")
    g = w.detach().float().view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    zero = lo.half()
    codes = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return codes.to(torch.uint8).view(N, K), scale, zero


def int4_dequantize(codes, scale, zero, dtype=torch.float32):
    """The (out, in) weight of int4_quantize's codes (out, in) and group scales and zeros (out, in / group)."""
    N, K = codes.shape
    g = codes.float().view(N, scale.size(1), -1) * scale.float()[..., None] + zero.float()[..., None]
    return g.view(N, K).to(dtype)


class Int4Linear(QuantLinear):
    """4-bit codes packed two per byte (out, in / 2), fp16 scale and zero per group of group_size inputs."""

    def __init__(self, codes, scale, zero, bias=None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.size(1)
        self.register_buffer('codes', pack_4bit(codes.reshape(-1)).view(self.out_features, -1))
        self.register_buffer('scales', scale)
        self.register_buffer('zeros', zero)
        # the CPU kernel's copy (see _pack_for_cpu), made at the first forward on CPU; not saved
        self.register_buffer('cpu_packed', torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer('cpu_scales_zeros', torch.empty(0, dtype=torch.bfloat16), persistent=False)
        self._bias(bias)

    @classmethod
    def from_linear(cls, lin, group_size=64):
        return cls(*int4_quantize(lin.weight, group_size), lin.bias)

    def unpacked(self):
        return unpack_4bit(self.codes.view(-1)).view(self.out_features, self.in_features)

    def dequantized_weight(self, dtype=torch.float32):
        return int4_dequantize(self.unpacked(), self.scales, self.zeros, dtype)

    def forward(self, x):
        if x.device.type != 'cpu' or not hasattr(torch.ops.aten, '_weight_int4pack_mm_for_cpu') or \
                self.in_features % 64:
            return super().forward(x)  # dequantize, then an ordinary matmul
        if self.cpu_packed.numel() == 0:
            self._pack_for_cpu()
        bf16, N = torch.bfloat16, self.out_features
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(bf16), self.cpu_packed,
                                                      self.group_size, self.cpu_scales_zeros)
        y = y[:, :N].reshape(*x.shape[:-1], N).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _pack_for_cpu(self):
        # ATen's int4 matmul for CPU wants its own tiled layout with out_features a multiple of 16 (padded with
        # zero rows) and, per group, bf16 (scale, zero + 8 * scale): it computes (q - 8) * scale + that. The copy
        # costs as much memory as the codes; without it every forward would unpack the whole matrix.
        pad = -self.out_features % 16
        codes = F.pad(self.unpacked().to(torch.int32), (0, 0, 0, pad))
        scale, zero = F.pad(self.scales.float(), (0, 0, 0, pad)), F.pad(self.zeros.float(), (0, 0, 0, pad))
        self.cpu_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.cpu_scales_zeros = torch.stack((scale, zero + 8 * scale), dim=2).transpose(0, 1).contiguous() \
            .to(torch.bfloat16)  # (in / group, out, 2)

    def rows(self, idx, dtype):
        codes = unpack_4bit(self.codes[idx].reshape(-1)).view(-1, self.in_features)
        flat = idx.reshape(-1)
        return int4_dequantize(codes, self.scales[flat], self.zeros[flat], dtype).view(*idx.shape, -1)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding table kept in a QuantLinear's format (V, C): a lookup dequantizes the rows it reads. GPT-2's
    table is also its output head, so both hold the same module and the int8/int4 matrix is stored once."""

    def __init__(self, table, dtype=torch.float32):
        super().__init__()
        self.table = table
        # an empty float tensor that model.to(dtype) casts: the dtype the looked-up rows come out in
        self.register_buffer('_out', torch.empty(0, dtype=dtype), persistent=False)
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, idx):
        return self.table.rows(idx, self._out.dtype)

    @property
    def weight(self):  # the whole table, for code that multiplies by it (BERT's tied MLM decoder)
        return self.table.dequantized_weight(self._out.dtype)


# ----------------------------------------------------------------------------------------------------------
# converting, saving and loading a model

SCHEMES = ('int8', 'int4', 'nf4', 'dynamic')


def _quantized(lin, scheme, group_size):
    if scheme in ('int8', 'dynamic'):
        q = Int8Linear.from_linear(lin)
        q.dynamic = scheme == 'dynamic' and hasattr(torch.ops.quantized, 'linear_dynamic')
        return q
    if scheme == 'int4':
        return Int4Linear.from_linear(lin, group_size)
    if scheme == 'nf4':
        return NF4Linear.from_linear(lin, group_size)
    raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")


def set_module(model, name, module):
    """model.get_submodule(name) = module (name dotted, as named_modules gives it)."""
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _embedding_names(model):
    """(token table's name or None, the Linear tied to it or None), for any module: the nn.Embedding whose weight a
    Linear shares (GPT-2's head), else the first one registered (token tables come before positions and segments)."""
    tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    heads = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = [(n, heads[id(model.get_submodule(n).weight)]) for n in tables if id(model.get_submodule(n).weight) in heads]
    return tied[0] if tied else (tables[0] if tables else None, None)


def quantize_model(model, scheme='int8', group_size=64, embeddings=True, skip=(), table_scheme=None):
    """Replace model's Linears (all, but names in skip) by scheme's quantized ones, in place, and with embeddings
    the token table too (tied to the head: one quantized matrix serves both), in table_scheme if given: 'int8'
    keeps a 4-bit model's table at 8 bits, as llama.cpp's Q4 files do (on SmolLM2, whose table is also its head,
    a 4-bit table costs +5.6% perplexity, an 8-bit one +0.3%). Returns the plan, a dict that load_quantized
    needs to rebuild the same structure: scheme, group_size, embeddings, skip (and table_scheme)."""
    emb_name, tied = _embedding_names(model)
    embeddings = embeddings and emb_name is not None
    table_kind = table_scheme or scheme
    if embeddings:
        emb = model.get_submodule(emb_name)
        dtype = emb.weight.dtype
    if embeddings and tied is None:  # its own table, quantized as a (V, C) matrix
        table = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device)
        table.weight = emb.weight
        set_module(model, emb_name, QuantEmbedding(_quantized(table, table_kind, group_size), dtype))
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name not in skip and (embeddings or name != tied):
            set_module(model, name, _quantized(m, table_kind if name == tied else scheme, group_size))
    if embeddings and tied is not None:
        set_module(model, emb_name, QuantEmbedding(model.get_submodule(tied), dtype))
    plan = dict(scheme=scheme, group_size=group_size, embeddings=embeddings, skip=list(skip))
    return {**plan, 'table_scheme': table_scheme} if table_scheme and table_scheme != scheme else plan


def weight_bytes(model):
    """Bytes of every parameter and buffer, each tensor once (a tied or shared one is counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def save_quantized(model, path, plan, extra=None):
    """A checkpoint of a quantize_model'd (or pruned) model: packed tensors as they are (a tied table once),
    pruned weights as a bit mask plus the kept values. extra: more keys (model_args is added, meta for sample.py).
    Written to a temporary file and renamed, so a crash never leaves half a file."""
    state, sparse = model.state_dict(), {}
    for name in plan.get('pruned', []):
        w = state.pop(name + '.weight')
        mask = (w != 0).cpu().numpy()
        sparse[name] = dict(shape=tuple(w.shape), bits=torch.from_numpy(np.packbits(mask)), values=w[w != 0].clone())
    obj = {'model': state, 'sparse': sparse, 'quantization': plan,
           'model_args': dataclasses.asdict(model.config), **(extra or {})}
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_quantized(ckpt):
    """The model that save_quantized wrote (a loaded checkpoint dict), in eval mode: built from model_args,
    given the same quantized structure, then filled with the saved tensors."""
    model = build_model(ModelConfig(**ckpt['model_args']))
    plan = ckpt['quantization']
    if plan.get('scheme'):
        quantize_model(model, plan['scheme'], plan['group_size'], plan['embeddings'], plan['skip'],
                       plan.get('table_scheme'))
    state = dict(ckpt['model'])
    for name, sp in (ckpt.get('sparse') or {}).items():
        n = int(np.prod(sp['shape']))
        # (a checkpoint read with map_location='cuda' has its tensors there; the mask is unpacked on the CPU)
        mask = torch.from_numpy(np.unpackbits(sp['bits'].cpu().numpy(), count=n).astype(bool)).view(sp['shape'])
        w = torch.zeros(sp['shape'], dtype=sp['values'].dtype)
        w[mask] = sp['values'].cpu()
        state[name + '.weight'] = w
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# pruning

# the Linears inside repeated blocks (a ModuleList's numbered children: transformer.h.3.mlp.fc), not the
# embeddings or the heads; QLoRA (finetune_lora.py) stores the same ones in NF4
BLOCK_LINEAR = re.compile(r'(^|\.)\d+\.')


def prunable(model):
    """(name, nn.Linear) of the linears pruning touches: inside the blocks, where most weights are."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and BLOCK_LINEAR.search(n)]


def prune(model, sparsity=0.5, scope='global', pattern='unstructured'):
    """Zero the smallest-magnitude weights of the block Linears, in place. pattern 'unstructured': exactly
    round(sparsity * n) weights, ranked over all layers together (scope 'global': layers that matter less lose
    more) or within each layer ('layer'); '2:4': the 2 smallest of every 4 consecutive inputs of a row (50%,
    the pattern sparse tensor cores run at 2x). Returns {name: fraction of that layer now zero}."""
    layers = prunable(model)
    if not layers:
        raise ValueError("the model has no Linear layers inside transformer blocks to prune")
    with torch.no_grad():
        if pattern == '2:4':
            for _, m in layers:
                w = m.weight.view(m.out_features, -1, 4)  # (out, in / 4, 4); in_features % 4 == 0 in every family
                drop = w.abs().argsort(dim=2)[..., :2]    # the two smallest of each group
                w.scatter_(2, drop, 0.0)
        elif pattern != 'unstructured':
            raise ValueError(f"pattern must be unstructured or 2:4, not {pattern!r}")
        elif not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), not {sparsity}")
        elif scope == 'layer':
            for _, m in layers:
                _zero_smallest(m.weight.view(-1), round(sparsity * m.weight.numel()))
        elif scope == 'global':
            flat = torch.cat([m.weight.detach().reshape(-1) for _, m in layers])
            _zero_smallest(flat, round(sparsity * flat.numel()))
            for (_, m), part in zip(layers, flat.split([m.weight.numel() for _, m in layers])):
                m.weight.copy_(part.view_as(m.weight))
        else:
            raise ValueError(f"scope must be global or layer, not {scope!r}")
    return {n: (m.weight == 0).float().mean().item() for n, m in layers}


def _zero_smallest(flat, k):
    # exactly k entries set to zero, the smallest |x| first (ties broken by position, so the count is exact)
    if k:
        flat[flat.abs().argsort()[:k]] = 0.0


# ----------------------------------------------------------------------------------------------------------
# measuring: what a scheme saves and what it costs

def file_bytes(model, plan=None):
    """Size on disk of the model saved alone (no optimizer state): fp32 weights, or the quantized checkpoint."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'm.pt')
        if plan is None:
            torch.save(model.state_dict(), path)
        else:
            save_quantized(model, path, plan)
        return os.path.getsize(path)


@torch.no_grad()
def decode_speed(model, new_tokens=64, prompt_len=16, batch_size=1, rounds=2):
    """Greedy decoding tokens/s (new tokens of all rows per second, the prompt's prefill included) from a
    random prompt; the best of rounds, after one warm-up."""
    import time
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen)
    prompt = prompt.to(next(model.parameters()).device)
    model.generate(prompt, 4, temperature=0)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        best = max(best, batch_size * new_tokens / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------------------
# the command line: quantize (or prune) a checkpoint, measure both, save the result

@dataclasses.dataclass
class QuantizeConfig:
    init_from: str = 'out'          # train.py out_dir | gpt2 .. gpt2-xl | hf:org/name | Hugging Face folder
    mode: str = 'int8'              # int8 | int4 | nf4 | dynamic (int8 weights and activations) | prune | gguf
    gguf_type: str = 'q8_0'         # gguf: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 (the 2-D weights)
    out: str = ''                   # gguf: the file to write; '' = <out_dir or .>/model-<gguf_type>.gguf
    group_size: int = 64            # int4 group / nf4 block: inputs sharing a scale
    embeddings: bool = True         # quantize the token table too (with GPT-2 it is also the output head)
    table_scheme: str = ''          # the table's (and a tied head's) scheme, e.g. int8 for an int4 model; '' = mode
    skip: str = ''                  # comma-separated Linear names to keep in full precision
    sparsity: float = 0.5           # prune: fraction of the block Linears' weights set to zero
    prune_scope: str = 'global'     # prune: rank weights over all layers (global) or within each (layer)
    prune_pattern: str = 'unstructured'  # prune: unstructured | 2:4 (2 of every 4 inputs; sparsity is then 0.5)
    eval_data: str = ''             # text file or prepare.py folder for perplexity; '' = the run's own data_dir
    eval_split: str = 'val'
    max_eval_tokens: int = 100_000  # 0 = all
    eval_stride: int = 0            # 0 = half the context (see train.eval_tokens)
    batch_size: int = 8
    sensitivity_tokens: int = 4096  # prune: tokens per layer for the loss each layer alone loses; 0 = skip
    decode_tokens: int = 64         # tokens generated for the tokens/s figure; 0 = skip
    out_dir: str = ''               # save the quantized checkpoint here (ckpt.pt, loads in sample.py)
    report: str = ''                # write the figures as JSON here
    device: str = 'cpu'
    seed: int = 1337
    trust_checkpoint: bool = False  # load checkpoints that need pickle (it can run code): trusted files only


def default_eval_data(init_from):
    # the data a train.py/finetune_lora.py run trained on: its val split is the fair test
    path = os.path.join(init_from, 'config.json')
    if os.path.isfile(path):
        import json
        data_dir = json.load(open(path)).get('data_dir', '')
        if data_dir and os.path.isfile(os.path.join(data_dir, 'meta.json')):
            return data_dir
    return ''


def measure(model, tok, cfg, ids, plan=None, pack=True):
    from model import pack_linears
    from train import eval_tokens
    out = {'size_bytes': file_bytes(model, plan), 'weight_bytes': weight_bytes(model)}
    if ids is not None:
        r = eval_tokens(model, ids, cfg.eval_stride, cfg.batch_size)
        out.update(val_loss=r['loss'], val_ppl=r['ppl'], val_tokens=r['tokens'])
    if cfg.decode_tokens:
        if pack:  # as sample.py decodes on CPU: Linears left in full precision use oneDNN's packed weights
            pack_linears(model)
        out['tokens_per_sec'] = decode_speed(model, cfg.decode_tokens)
    return out


def layer_sensitivity(model, ids, cfg):
    """Per block Linear: the loss increase on the first sensitivity_tokens of ids when that layer alone is pruned
    as cfg says. Which layers a model can least afford to prune."""
    from train import eval_tokens
    ids = ids[:cfg.sensitivity_tokens]
    base = eval_tokens(model, ids, cfg.eval_stride, cfg.batch_size)['loss']
    out = {}
    for name, lin in prunable(model):
        keep = lin.weight.detach().clone()
        solo = nn.Module()
        solo.transformer = nn.ModuleDict({'h': nn.ModuleList([nn.ModuleDict({'x': lin})])})
        solo.config = model.config
        prune(solo, cfg.sparsity, 'layer', cfg.prune_pattern)
        out[name] = eval_tokens(model, ids, cfg.eval_stride, cfg.batch_size)['loss'] - base
        with torch.no_grad():
            lin.weight.copy_(keep)
    return out


def export_gguf(model, tok, cfg, ids):
    """--mode=gguf: write the model and its tokenizer as GGUF (weights.save_gguf), read the file back as llama.cpp
    would see it, and report the file's size and perplexity against the original."""
    import json
    import bpe
    from configurator import UserError, atomic_write
    from weights import GGUF_TYPES, GGUFError, model_from_gguf, save_gguf
    if cfg.gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, not '{cfg.gguf_type}'")
    path = cfg.out or os.path.join(cfg.out_dir or '.', f'model-{cfg.gguf_type}.gguf')
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    source = getattr(tok, 'bpe', None)
    if source is None and tok.meta.get('kind') == 'tiktoken':  # GPT-2's encoding: its ranks, as bpe.py holds them
        try:
            source = bpe.Tokenizer.from_tiktoken(tok.meta['name'])
        except bpe.BPEError as e:
            raise UserError(str(e)) from None
    try:
        save_gguf(model, path, source, cfg.gguf_type, name=os.path.basename(os.path.normpath(cfg.init_from)))
        back = model_from_gguf(path)
    except GGUFError as e:
        raise UserError(str(e)) from None
    report = {'init_from': cfg.init_from, 'mode': 'gguf', 'gguf_type': cfg.gguf_type, 'path': path,
              'size_bytes': os.path.getsize(path), 'original_bytes': file_bytes(model)}
    if ids is not None:
        from train import eval_tokens
        report['original_ppl'] = eval_tokens(model, ids, cfg.eval_stride, cfg.batch_size)['ppl']
        report['gguf_ppl'] = eval_tokens(back, ids, cfg.eval_stride, cfg.batch_size)['ppl']
    print(f"wrote {path}: {report['size_bytes'] / 1e6:.1f} MB ({report['original_bytes'] / report['size_bytes']:.2f}x "
          f"smaller than fp32)" + (f", val perplexity {report['original_ppl']:.3f} -> {report['gguf_ppl']:.3f} read "
                                   f"back" if ids is not None else ''))
    print(f"run it: llama-cli -m {path}   or in Ollama: a Modelfile with 'FROM ./{os.path.basename(path)}'; "
          f"here: python sample.py --init_from={path}")
    if cfg.report:
        with atomic_write(cfg.report) as f:
            json.dump(report, f, indent=2)
    return report


def main(argv):
    import copy
    import json
    from configurator import UserError, atomic_write, parse_config, print_config, writable_dir, writable_file
    from train import eval_data_tokens, load_model, resolve_device
    cfg = parse_config(QuantizeConfig, argv)
    writable_dir(cfg.out_dir, 'out_dir')
    writable_file(cfg.out, 'out')
    writable_file(cfg.report, 'report')
    if cfg.mode not in SCHEMES + ('prune', 'gguf'):
        raise UserError(f"mode must be int8, int4, nf4, dynamic, prune or gguf, not '{cfg.mode}'")
    if cfg.mode == 'prune' and not (0 <= cfg.sparsity < 1 and cfg.prune_scope in ('global', 'layer') and
                                    cfg.prune_pattern in ('unstructured', '2:4')):
        raise UserError("prune needs 0 <= sparsity < 1, prune_scope global|layer, prune_pattern unstructured|2:4")
    if cfg.table_scheme not in ('',) + SCHEMES:
        raise UserError(f"table_scheme must be one of {', '.join(SCHEMES)} (or '' for the mode's), not "
                        f"'{cfg.table_scheme}'")
    if cfg.group_size < 2 or cfg.group_size % 2:
        raise UserError(f"group_size must be an even number >= 2 (e.g. 32, 64, 128), not {cfg.group_size}")
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.init_from, device, 'float32', cfg.trust_checkpoint)
    if cfg.mode in ('int4', 'nf4') and 32 % cfg.group_size and cfg.init_from.endswith('.gguf'):
        from weights import read_gguf
        if {t.type for t in read_gguf(cfg.init_from).tensors.values()} & {2, 3, 6, 7}:  # Q4_0, Q4_1, Q5_0, Q5_1
            print(f"note: the file's weights are already 4- or 5-bit in blocks of 32, and one 4-bit grid per "
                  f"{cfg.group_size} weights cannot hold two blocks' levels (SmolLM2's Q4_1 file: +37% perplexity "
                  f"at 64, none at 32): pass --group_size=32")
    if getattr(model, 'quantization', None) or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UserError(f"'{cfg.init_from}' is already quantized: start from the full-precision checkpoint")
    ids, default = None, not cfg.eval_data
    cfg.eval_data = cfg.eval_data or default_eval_data(cfg.init_from)
    if cfg.eval_data:
        try:
            ids = eval_data_tokens(cfg, tok)
        except UserError as e:
            if not default:
                raise
            print(f"not measuring perplexity on the run's data_dir: {e}")
    elif model.config.model_type != 'bert':
        print("no --eval_data (and no data_dir in the run's config.json): perplexity is not measured")
    if model.config.model_type == 'bert':
        ids, cfg.decode_tokens = None, 0  # an encoder: neither next-token perplexity nor decoding
    skip = [s for s in cfg.skip.split(',') if s]
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if set(skip) - names:
        raise UserError(f"--skip names no Linear: {sorted(set(skip) - names)[:3]}; Linears are e.g. {sorted(names)[:3]}")

    if cfg.mode == 'gguf':
        return export_gguf(model, tok, cfg, ids)
    result = copy.deepcopy(model)
    if cfg.mode == 'prune':
        sparsity = prune(result, cfg.sparsity, cfg.prune_scope, cfg.prune_pattern)
        plan = dict(scheme=None, pruned=list(sparsity))
    else:
        try:
            plan = quantize_model(result, cfg.mode, cfg.group_size, cfg.embeddings, skip, cfg.table_scheme or None)
        except ValueError as e:
            raise UserError(f"{e}: pick a --group_size that divides it, or --skip that layer") from None
    print("measuring the original ...")
    before = measure(model, tok, cfg, ids)
    del model
    print(f"measuring the {cfg.mode} model ...")
    after = measure(result, tok, cfg, ids, plan, pack=True)

    rows = [('size on disk (MB)', 'size_bytes', 1e-6), ('weight memory (MB)', 'weight_bytes', 1e-6),
            ('val perplexity', 'val_ppl', 1), ('decode tokens/s', 'tokens_per_sec', 1)]
    print(f"\n| {'':22} | {'original':>10} | {cfg.mode:>10} | {'ratio':>7} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    for label, key, unit in rows:
        if key in before:
            print(f"| {label:22} | {before[key] * unit:10.3f} | {after[key] * unit:10.3f} | "
                  f"{after[key] / before[key]:7.3f} |")
    report = {'init_from': cfg.init_from, 'mode': cfg.mode, 'eval_data': cfg.eval_data, 'original': before,
              'result': after, 'plan': plan}
    if cfg.mode == 'prune':
        report['sparsity'] = sparsity
        if ids is not None and cfg.sensitivity_tokens:
            loss = layer_sensitivity(load_model(cfg.init_from, device, 'float32', cfg.trust_checkpoint)[0], ids, cfg)
            report['loss_increase_per_layer'] = loss
            worst = sorted(loss, key=loss.get, reverse=True)[:5]
            print("layers that lose most when pruned alone (loss increase): " +
                  ', '.join(f"{n} {loss[n]:+.4f}" for n in worst))
    if cfg.out_dir:
        from train import load_checkpoint
        os.makedirs(cfg.out_dir, exist_ok=True)
        src = os.path.join(cfg.init_from, 'ckpt.pt')
        meta = load_checkpoint(src, trust=cfg.trust_checkpoint)['meta'] if os.path.isfile(src) else {'tokenizer': tok.meta}
        save_quantized(result, os.path.join(cfg.out_dir, 'ckpt.pt'), plan, {'meta': meta})
        print(f"saved {os.path.join(cfg.out_dir, 'ckpt.pt')}: python sample.py --init_from={cfg.out_dir}")
    if cfg.report:
        with atomic_write(cfg.report) as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == '__main__':
    from configurator import run_cli
    run_cli(main)

"""
Weight quantization: store a Linear's weight in fewer bits and dequantize it on the fly in forward.

    q = nf4_quantize(lin.weight)                  # 4-bit NormalFloat codes + double-quantized block scales
    w = nf4_dequantize(q, torch.bfloat16)         # the (out, in) weight again, within NF4's rounding error
    layer = NF4Linear.from_linear(lin)            # swaps in for nn.Linear; ~0.52 bytes per weight

NF4 is QLoRA's format (Dettmers et al. 2023): a frozen base model in 4 bits under trainable LoRA adapters.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F

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


class NF4Linear(nn.Module):
    """Swaps in for a frozen nn.Linear: the weight is kept as NF4 codes and quantized scales (buffers, so the
    state_dict holds the small tensors) and dequantized in each forward to the input's dtype. The bias stays in
    full precision. Nothing here is trained: gradients flow through to the input only."""

    def __init__(self, q, bias=None):
        super().__init__()
        self.out_features, self.in_features = q['shape']
        self.block_size, self.dq_block = q['block_size'], q['dq_block']
        for k in _NF4_TENSORS:
            if k in q:
                self.register_buffer(k, q[k])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

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

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def to_linear(self):
        """A plain fp32 nn.Linear with the dequantized weight (to export or to merge into)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def weight_bytes(self):
        """Bytes the quantized weight takes: codes and scales (not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"block_size={self.block_size}, double_quant={hasattr(self, 'absmax_q')}"

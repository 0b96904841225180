"""ggml's (llama.cpp's) block quantization formats, dequantized and quantized in vectorised numpy.

A quantized tensor is a run of fixed-size blocks along its last (contiguous) dimension; each block holds
`block` elements in `size` bytes: one or two fp16 scales and packed integer codes. Every format below is
written as a numpy structured dtype, so its byte layout reads at a glance and a buffer becomes an array of
blocks with one `view`, no copy.

Results are bit for bit those of the `gguf` package (gguf.quants), which follows ggml's C reference: scales
are widened to fp32 first and every product is taken in fp32, in the same order (for the K formats the
sub-block scale is multiplied into the super-block scale before the code is).

    dequantize(data, type_id, shape, name) -> float32 array of `shape` (numpy order: last dim contiguous)
    quantize(x, type_id) -> uint8 array (..., bytes per row), as llama.cpp writes it

Imports only numpy, so it can be copied alone into another project.
"""
import math

import numpy as np


class GGUFError(ValueError):
    """A tensor that cannot be read or written in a ggml format; the message says which and what to do."""


# ggml type id -> (name, elements per block, bytes per block), from ggml.h and ggml-common.h. (gguf-py says 40
# bytes for Q8_1, from when its scales were fp32; ggml's block_q8_1 has two fp16s now. It is never stored.)
GGML_TYPES = {
    0: ('F32', 1, 4), 1: ('F16', 1, 2), 2: ('Q4_0', 32, 18), 3: ('Q4_1', 32, 20),
    6: ('Q5_0', 32, 22), 7: ('Q5_1', 32, 24), 8: ('Q8_0', 32, 34), 9: ('Q8_1', 32, 36),
    10: ('Q2_K', 256, 84), 11: ('Q3_K', 256, 110), 12: ('Q4_K', 256, 144), 13: ('Q5_K', 256, 176),
    14: ('Q6_K', 256, 210), 15: ('Q8_K', 256, 292), 16: ('IQ2_XXS', 256, 66), 17: ('IQ2_XS', 256, 74),
    18: ('IQ3_XXS', 256, 98), 19: ('IQ1_S', 256, 50), 20: ('IQ4_NL', 32, 18), 21: ('IQ3_S', 256, 110),
    22: ('IQ2_S', 256, 82), 23: ('IQ4_XS', 256, 136), 24: ('I8', 1, 1), 25: ('I16', 1, 2), 26: ('I32', 1, 4),
    27: ('I64', 1, 8), 28: ('F64', 1, 8), 29: ('IQ1_M', 256, 56), 30: ('BF16', 1, 2), 34: ('TQ1_0', 256, 54),
    35: ('TQ2_0', 256, 66), 39: ('MXFP4', 32, 17), 40: ('NVFP4', 64, 36), 41: ('Q1_0', 128, 18),
}
# Ids that ggml has retired; files that use them need an older llama.cpp to convert.
RETIRED_TYPES = {4: 'Q4_2', 5: 'Q4_3', 31: 'Q4_0_4_4', 32: 'Q4_0_4_8', 33: 'Q4_0_8_8'}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}


# --- block layouts ------------------------------------------------------------------------------------------
# Fields are little-endian and packed (no padding), exactly as in ggml's block_* structs.

# Q4_0, 18 bytes / 32 weights: fp16 scale d, then 16 bytes of 4-bit codes q: w = d * (q - 8).
# Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
BLOCK_Q4_0 = np.dtype([('d', '<f2'), ('qs', 'u1', 16)])
# Q4_1, 20 bytes / 32: scale d, offset m (the block's minimum), 16 bytes of codes: w = d * q + m.
BLOCK_Q4_1 = np.dtype([('d', '<f2'), ('m', '<f2'), ('qs', 'u1', 16)])
# Q5_0, 22 bytes / 32: d, a 32-bit word whose bit j is the fifth bit of weight j, the low nibbles as in
# Q4_0: w = d * (q - 16).
BLOCK_Q5_0 = np.dtype([('d', '<f2'), ('qh', 'u1', 4), ('qs', 'u1', 16)])
# Q5_1, 24 bytes / 32: d, m, fifth bits, low nibbles: w = d * q + m.
BLOCK_Q5_1 = np.dtype([('d', '<f2'), ('m', '<f2'), ('qh', 'u1', 4), ('qs', 'u1', 16)])
# Q8_0, 34 bytes / 32: d, then one signed byte per weight: w = d * q.
BLOCK_Q8_0 = np.dtype([('d', '<f2'), ('qs', 'i1', 32)])

# The K formats: super-blocks of 256 weights split into sub-blocks of 16 or 32, each with its own small
# integer scale (and min) that multiplies the fp16 super-block scale d (and dmin).
# Q2_K, 84 bytes: 16 bytes of sub-block (scale, min) nibbles (scale low, min high) for 16 sub-blocks of 16,
# 64 bytes of 2-bit codes, d, dmin: w = d * scale * q - dmin * min.
BLOCK_Q2_K = np.dtype([('scales', 'u1', 16), ('qs', 'u1', 64), ('d', '<f2'), ('dmin', '<f2')])
# Q3_K, 110 bytes: 32 bytes of high bits (hmask), 64 bytes of 2-bit low codes, 12 bytes packing 16 6-bit
# scales, d. w = d * (scale - 32) * (q - 4), where q = low + 4 * high: a set high bit means no -4 offset.
BLOCK_Q3_K = np.dtype([('hmask', 'u1', 32), ('qs', 'u1', 64), ('scales', 'u1', 12), ('d', '<f2')])
# Q4_K, 144 bytes: d, dmin, 12 bytes packing 8 6-bit scales and 8 6-bit mins for 8 sub-blocks of 32,
# 128 bytes of 4-bit codes: w = d * scale * q - dmin * min.
BLOCK_Q4_K = np.dtype([('d', '<f2'), ('dmin', '<f2'), ('scales', 'u1', 12), ('qs', 'u1', 128)])
# Q5_K, 176 bytes: as Q4_K with 32 bytes of fifth bits (qh) before the nibbles.
BLOCK_Q5_K = np.dtype([('d', '<f2'), ('dmin', '<f2'), ('scales', 'u1', 12), ('qh', 'u1', 32),
                       ('qs', 'u1', 128)])
# Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales (one per
# sub-block of 16), d: w = d * scale * (q - 32).
BLOCK_Q6_K = np.dtype([('ql', 'u1', 128), ('qh', 'u1', 64), ('scales', 'i1', 16), ('d', '<f2')])


def _fields(packed, bits, group):
    """Split packed codes into `bits`-wide fields. In each run of `group` bytes, byte l holds elements l,
    l + group, l + 2 * group, ... of that run, lowest bits first; every ggml format packs this way, only
    the run length differs. (n, m) uint8 -> (n, m * 8 // bits) uint8.
    _fields([[0x21, 0x43]], 4, 2) -> [[1, 3, 2, 4]]"""
    packed = np.asarray(packed, dtype=np.uint8)
    n, m = packed.shape
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]  # (8 // bits, 1)
    out = (packed.reshape(n, m // group, 1, group) >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(n, -1)


def _f32(half):
    """fp16 scales (n,) -> fp32 (n, 1), ready to broadcast over a block."""
    return half.astype(np.float32)[:, None]


# --- dequantize: structured blocks (n,) -> float32 (n, elements per block) ----------------------------------

def _dequantize_q4_0(b):
    q = _fields(b['qs'], 4, 16).astype(np.float32)
    q -= 8
    q *= _f32(b['d'])
    return q


def _dequantize_q4_1(b):
    q = _fields(b['qs'], 4, 16).astype(np.float32)
    q *= _f32(b['d'])
    q += _f32(b['m'])
    return q


def _five_bit_codes(b):
    return _fields(b['qs'], 4, 16) | (_fields(b['qh'], 1, 1) << np.uint8(4))


def _dequantize_q5_0(b):
    q = _five_bit_codes(b).astype(np.float32)
    q -= 16
    q *= _f32(b['d'])
    return q


def _dequantize_q5_1(b):
    q = _five_bit_codes(b).astype(np.float32)
    q *= _f32(b['d'])
    q += _f32(b['m'])
    return q


def _dequantize_q8_0(b):
    return np.multiply(b['qs'], _f32(b['d']), dtype=np.float32)


def _sub_blocks(q, scale, offset=None):
    """w = scale * q - offset per sub-block: q (n, 256) codes, scale and offset (n, k) fp32 for k sub-blocks."""
    n, k = scale.shape
    w = q.astype(np.float32).reshape(n, k, -1)
    w *= scale[:, :, None]
    if offset is not None:
        w -= offset[:, :, None]
    return w.reshape(n, -1)


def _dequantize_q2_k(b):
    scale = _f32(b['d']) * (b['scales'] & np.uint8(15)).astype(np.float32)
    offset = _f32(b['dmin']) * (b['scales'] >> np.uint8(4)).astype(np.float32)
    return _sub_blocks(_fields(b['qs'], 2, 32), scale, offset)


def _dequantize_q3_k(b):
    s = b['scales']
    # 16 6-bit scales: low 4 bits are the nibbles of bytes 0-7, high 2 bits the crumbs of bytes 8-11.
    scales = _fields(s[:, :8], 4, 8) | (_fields(s[:, 8:], 2, 4) << np.uint8(4))
    scale = _f32(b['d']) * (scales.astype(np.float32) - 32)
    # Codes are in -4..3; the high bit is stored inverted, so a set bit means no -4.
    q = _fields(b['qs'], 2, 32).astype(np.int8) - 4 * (1 - _fields(b['hmask'], 1, 32).astype(np.int8))
    return _sub_blocks(q, scale)


def _k_scales_mins(s):
    """Q4_K/Q5_K's 12 scale bytes -> 8 scales and 8 mins, 6 bits each. Sub-blocks 0-3 take the low 6 bits of
    bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take their low 4 bits from the nibbles of bytes 8-11
    (scale low, min high) and their top 2 bits from the top bits of bytes 0-3 and 4-7."""
    low6, top2 = s[:, :8] & np.uint8(63), s[:, :8] >> np.uint8(6)
    nib = s[:, 8:]
    scales = np.concatenate([low6[:, :4], (nib & np.uint8(15)) | (top2[:, :4] << np.uint8(4))], axis=1)
    mins = np.concatenate([low6[:, 4:], (nib >> np.uint8(4)) | (top2[:, 4:] << np.uint8(4))], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _dequantize_q4_k(b):
    scales, mins = _k_scales_mins(b['scales'])
    return _sub_blocks(_fields(b['qs'], 4, 32), _f32(b['d']) * scales, _f32(b['dmin']) * mins)


def _dequantize_q5_k(b):
    scales, mins = _k_scales_mins(b['scales'])
    q = _fields(b['qs'], 4, 32) | (_fields(b['qh'], 1, 32) << np.uint8(4))
    return _sub_blocks(q, _f32(b['d']) * scales, _f32(b['dmin']) * mins)


def _dequantize_q6_k(b):
    q = _fields(b['ql'], 4, 64) | (_fields(b['qh'], 2, 32) << np.uint8(4))
    return _sub_blocks(q.astype(np.int8) - 32, _f32(b['d']) * b['scales'].astype(np.float32))


_BLOCK_FORMATS = {  # type id -> (block dtype, dequantizer)
    2: (BLOCK_Q4_0, _dequantize_q4_0), 3: (BLOCK_Q4_1, _dequantize_q4_1), 6: (BLOCK_Q5_0, _dequantize_q5_0),
    7: (BLOCK_Q5_1, _dequantize_q5_1), 8: (BLOCK_Q8_0, _dequantize_q8_0), 10: (BLOCK_Q2_K, _dequantize_q2_k),
    11: (BLOCK_Q3_K, _dequantize_q3_k), 12: (BLOCK_Q4_K, _dequantize_q4_k), 13: (BLOCK_Q5_K, _dequantize_q5_k),
    14: (BLOCK_Q6_K, _dequantize_q6_k),
}
DEQUANTIZE_TYPES = {0, 1, 30, *_BLOCK_FORMATS}


def type_name(type_id):
    """12 -> 'Q4_K'; an id ggml never had -> 'unknown type 99'."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id][0]
    return RETIRED_TYPES.get(type_id, f'unknown type {type_id}')


def _supported_type(type_id, supported, what, name):
    if type_id not in supported:
        can = ', '.join(GGML_TYPES[i][0] for i in sorted(supported))
        raise GGUFError(f'tensor {name}: ggml type {type_name(type_id)} ({type_id}) cannot be {what} here; '
                        f'convert the model with llama.cpp to one of {can}')
    return GGML_TYPES[type_id]


def tensor_nbytes(type_id, shape, name='?'):
    """Bytes a tensor of `shape` (numpy order) takes in ggml type `type_id`. (8, (4, 64)) -> 272"""
    tname, block, size = GGML_TYPES[type_id] if type_id in GGML_TYPES else (type_name(type_id), None, None)
    if block is None:
        raise GGUFError(f'tensor {name}: ggml type {tname} is unknown to this reader; update it or re-convert')
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    if cols % block:
        raise GGUFError(f'tensor {name}: {tname} {list(shape)} has a last dimension of {cols}, not a multiple '
                        f'of its block of {block}; the file is corrupt or was written by a broken converter')
    return math.prod(shape) // block * size


def _as_bytes(data):
    """A flat uint8 view of an array or buffer (a memory-mapped file's slice stays a view)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def dequantize(data, type_id, shape, name='?'):
    """Decode one tensor's raw bytes into a float32 array of `shape` (numpy order: GGUF lists dims fastest
    first, so pass them reversed). `data` is any uint8 buffer or array (an np.memmap slice is not copied).
    F32 comes back as a view of `data`, read-only when `data` is; every other type is a new array."""
    tname, _, _ = _supported_type(type_id, DEQUANTIZE_TYPES, 'read', name)
    shape = tuple(int(s) for s in shape)
    need = tensor_nbytes(type_id, shape, name)
    raw = _as_bytes(data)
    if raw.size != need:
        raise GGUFError(f'tensor {name}: {tname} {list(shape)} needs {need} bytes, the file has {raw.size}; '
                        f'the file is truncated or corrupt, download or convert it again')
    if type_id == 0:    # F32
        return raw.view('<f4').reshape(shape)
    if type_id == 1:    # F16
        return raw.view('<f2').astype(np.float32).reshape(shape)
    if type_id == 30:   # BF16: the top half of an fp32
        return (raw.view('<u2').astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    block_dtype, decode = _BLOCK_FORMATS[type_id]
    return decode(raw.view(block_dtype)).reshape(shape)


# --- quantize: float32 blocks (n, 32) -> structured blocks (n,), ggml's reference rounding -------------------

def _inverse(d):
    """1 / d, and 0 where d is 0 (an all-zero block), as ggml does."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _round_half_away(v):
    """C's roundf: halves go away from zero (np.round sends them to even). v - trunc(v) is exact."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _pack_nibbles(q):
    """(n, 32) codes 0..15 -> (n, 16) bytes: weight j low, weight j + 16 high."""
    return (q[:, :16] & np.uint8(15)) | (q[:, 16:] << np.uint8(4))


def _signed_max(x):
    """Each row's value of largest magnitude, sign kept (the first one on ties, as ggml's loop finds)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _symmetric_codes(x, levels):
    """Q4_0/Q5_0: d = max / -(levels / 2), so the largest-magnitude weight maps to code 0 and its sign is
    carried by d; codes are trunc(x / d + levels / 2 + 0.5), clamped to levels - 1 (the + 0.5 rounds)."""
    d = _signed_max(x) / np.float32(-(levels // 2))
    q = np.trunc(x * _inverse(d)[:, None] + np.float32(levels // 2 + 0.5))
    return d, np.clip(q, 0, levels - 1).astype(np.uint8)


def _affine_codes(x, levels):
    """Q4_1/Q5_1: d = (max - min) / (levels - 1), m = min, codes trunc((x - min) / d + 0.5) clamped."""
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / np.float32(levels - 1)
    q = np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5))
    return d, lo, np.clip(q, 0, levels - 1).astype(np.uint8)


def _quantize_q4_0(x, b):
    b['d'], q = _symmetric_codes(x, 16)
    b['qs'] = _pack_nibbles(q)


def _quantize_q4_1(x, b):
    b['d'], b['m'], q = _affine_codes(x, 16)
    b['qs'] = _pack_nibbles(q)


def _quantize_q5_0(x, b):
    b['d'], q = _symmetric_codes(x, 32)
    b['qh'] = np.packbits(q >> np.uint8(4), axis=1, bitorder='little')  # bit j of the word = weight j
    b['qs'] = _pack_nibbles(q)


def _quantize_q5_1(x, b):
    b['d'], b['m'], q = _affine_codes(x, 32)
    b['qh'] = np.packbits(q >> np.uint8(4), axis=1, bitorder='little')
    b['qs'] = _pack_nibbles(q)


def _quantize_q8_0(x, b):
    d = np.abs(x).max(axis=1) / np.float32(127)
    b['d'] = d
    b['qs'] = _round_half_away(x * _inverse(d)[:, None])


def _bf16_bits(x):
    """fp32 -> bf16 bits, rounding to nearest even; NaNs are kept NaN (quiet bit set), as ggml does."""
    u = x.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype('<u2')


_QUANTIZERS = {2: _quantize_q4_0, 3: _quantize_q4_1, 6: _quantize_q5_0, 7: _quantize_q5_1, 8: _quantize_q8_0}
QUANTIZE_TYPES = {0, 1, 30, *_QUANTIZERS}


def quantize(x, type_id):
    """Encode float weights (..., cols) in ggml type `type_id` as llama.cpp's reference quantizer does:
    uint8 (..., bytes per row), ready to write into a GGUF file."""
    tname, block, size = _supported_type(type_id, QUANTIZE_TYPES, 'written', '?')
    x = np.ascontiguousarray(x, dtype=np.float32)
    tensor_nbytes(type_id, x.shape)  # checks the last dimension
    byte_shape = (*x.shape[:-1], x.shape[-1] // block * size)
    if type_id == 0:
        return x.astype('<f4', copy=False).view(np.uint8).reshape(byte_shape)
    if type_id == 1:
        return x.astype('<f2').view(np.uint8).reshape(byte_shape)
    if type_id == 30:
        return _bf16_bits(x).view(np.uint8).reshape(byte_shape)
    block_dtype, _ = _BLOCK_FORMATS[type_id]
    blocks = np.empty(x.size // block, dtype=block_dtype)
    _QUANTIZERS[type_id](x.reshape(-1, block), blocks)
    return blocks.view(np.uint8).reshape(byte_shape)

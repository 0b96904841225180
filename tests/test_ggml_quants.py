"""ggml_quants.py: every ggml format dequantizes bit for bit as the gguf package does (on random blocks and on a
real llama.cpp file), the quantizers write the bytes the package's ggml reference rounding writes, and bad
tensors fail with a message naming the tensor, the type and what to do."""
import time

import numpy as np
import pytest

gguf = pytest.importorskip('gguf')
import gguf.quants as gq
from gguf import GGMLQuantizationType as T

import weights as G
from conftest import shared_file

MODEL = ('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
# Byte offsets of the fp16 scale fields in one block, read off ggml's block_* structs (kept apart from the
# module's dtypes so a wrong field order there cannot hide).
FP16_FIELDS = {'Q4_0': [0], 'Q4_1': [0, 2], 'Q5_0': [0], 'Q5_1': [0, 2], 'Q8_0': [0], 'Q2_K': [80, 82],
               'Q3_K': [108], 'Q4_K': [0, 2], 'Q5_K': [0, 2], 'Q6_K': [208]}
DEQUANTIZE = ['F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K', 'Q4_K', 'Q5_K', 'Q6_K']
QUANTIZE = ['F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0']


def same_bits(a, b):
    """Bit for bit: np.array_equal would let -0.0 pass for 0.0 and fail on equal NaNs."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def package_can_quantize(qtype):
    try:
        gq.quantize(np.zeros((1, 256), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def random_weights(rng, rows, cols):
    """Rows of very different scales and offsets, plus the blocks that trip rounding: all zero, constant,
    one nonzero value, negative extremes, exact halves (C's roundf vs round-half-even)."""
    x = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-8, 4, (rows, 1))) + rng.normal(0, 1, (rows, 1))
    x[0] = 0
    x[1] = 0.3
    x[2] = 0
    x[2, 5] = -2.5
    x[3] = -np.abs(x[3])
    x[4] = rng.integers(-254, 255, cols) / 2
    x[4, ::32] = 127  # d = 1 in Q8_0, so every half above is a tie
    return x.astype(np.float32)


def random_raw_blocks(rng, name, rows, cols):
    """Random bytes in type `name`, its fp16 scales overwritten with finite values of all sizes and signs."""
    _, block, size = G.GGML_TYPES[G.TYPE_IDS[name]]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in FP16_FIELDS.get(name, []):
        scales = (rng.standard_normal(len(raw)) * np.exp(rng.uniform(-12, 6, len(raw)))).astype('<f2')
        raw[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def test_type_table_matches_gguf_package():
    for qtype, sizes in gguf.GGML_QUANT_SIZES.items():
        if qtype.name == 'Q8_1':
            sizes = (32, 36)  # gguf-py keeps the old fp32 scales' 40 bytes; ggml's block_q8_1 is 2 fp16 + 32
        assert G.GGML_TYPES[int(qtype)] == (qtype.name, *sizes), qtype.name
    for name in DEQUANTIZE:
        assert G.TYPE_IDS[name] == int(T[name])


@pytest.mark.parametrize('name', DEQUANTIZE)
def test_dequantize_is_bit_exact_with_gguf(name):
    rng = np.random.default_rng(G.TYPE_IDS[name])
    qtype, rows, cols = T[name], 48, 512
    cases = [random_raw_blocks(rng, name, rows, cols)]  # every code and scale pattern, NaN bits for F16/BF16
    if package_can_quantize(qtype):
        cases.append(np.asarray(gq.quantize(random_weights(rng, rows, cols), qtype)).view(np.uint8))
    for raw in cases:
        ours = G.dequantize(raw, int(qtype), (rows, cols), 'x')
        assert same_bits(ours, gq.dequantize(raw, qtype))
        flat = np.frombuffer(raw.tobytes(), np.uint8)  # a flat buffer and a 3-d shape read the same
        assert same_bits(G.dequantize(flat, int(qtype), (2, rows // 2, cols)), ours.reshape(2, rows // 2, cols))


@pytest.mark.parametrize('name', QUANTIZE)
def test_quantize_is_bit_exact_with_gguf(name):
    rng = np.random.default_rng(100 + G.TYPE_IDS[name])
    x = random_weights(rng, 64, 256)
    if name in ('F16', 'BF16'):
        x[5, :4] = [np.inf, -np.inf, np.nan, 1e-40]  # specials and a subnormal
        x[5, 4:8] = np.array([0x7F800001, 0xFFC00001, 0x3F808000, 0x3F818000], np.uint32).view(np.float32)
    ours = G.quantize(x, G.TYPE_IDS[name])
    assert ours.dtype == np.uint8
    assert same_bits(ours, np.ascontiguousarray(gq.quantize(x, T[name])).view(np.uint8))
    if name not in ('F16', 'BF16'):  # and it reads back as the package reads it
        assert same_bits(G.dequantize(ours, G.TYPE_IDS[name], x.shape), gq.dequantize(ours, T[name]))


@pytest.fixture(scope='module')
def reader():
    return gguf.GGUFReader(shared_file(*MODEL))


def numpy_shape(tensor):
    return tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims fastest first


def test_real_file_tensors_match_gguf(reader):
    tensors = {t.name: t for t in reader.tensors}
    names = ['token_embd.weight', 'blk.0.attn_norm.weight', 'blk.0.attn_q.weight', 'blk.0.ffn_down.weight',
             'blk.29.ffn_gate.weight']
    assert tensors['token_embd.weight'].tensor_type == T.Q8_0 and tensors['blk.0.attn_q.weight'].tensor_type == T.Q4_1
    for name in names:
        t = tensors[name]
        ours = G.dequantize(t.data, int(t.tensor_type), numpy_shape(t), name)
        assert ours.shape == numpy_shape(t)
        assert same_bits(ours, gq.dequantize(t.data, t.tensor_type).reshape(ours.shape)), name


def test_whole_real_file_dequantize_time(reader):
    tensors = [(t.name, t.data, int(t.tensor_type), numpy_shape(t)) for t in reader.tensors]
    start = time.perf_counter()
    weights = [G.dequantize(data, type_id, shape, name) for name, data, type_id, shape in tensors]
    seconds = time.perf_counter() - start
    print(f'\ndequantized {sum(w.size for w in weights) / 1e6:.1f}M weights in {len(weights)} tensors '
          f'in {seconds:.3f} s')


def test_errors_name_the_tensor_type_and_fix():
    q41 = G.TYPE_IDS['Q4_1']
    with pytest.raises(G.GGUFError, match=r'^tensor blk\.0\.ffn_gate\.weight: Q4_1 \[1536, 576\] needs 552960 '
                                          r'bytes, the file has 552940; .*again$'):
        G.dequantize(np.zeros(552940, np.uint8), q41, (1536, 576), 'blk.0.ffn_gate.weight')
    with pytest.raises(G.GGUFError, match=r'tensor w: Q4_1 \[4, 48\] has a last dimension of 48, not a multiple '
                                          r'of its block of 32'):
        G.dequantize(np.zeros(60, np.uint8), q41, (4, 48), 'w')
    with pytest.raises(G.GGUFError, match=r'tensor w: ggml type IQ2_XXS \(16\) cannot be read here; convert the '
                                          r'model with llama.cpp to one of F32, F16, Q4_0.*BF16$'):
        G.dequantize(np.zeros(66, np.uint8), G.TYPE_IDS['IQ2_XXS'], (1, 256), 'w')
    with pytest.raises(G.GGUFError, match=r'Q4_0_4_4 \(31\) cannot be read'):
        G.dequantize(np.zeros(18, np.uint8), 31, (1, 32), 'w')
    with pytest.raises(G.GGUFError, match=r'unknown type 99 \(99\) cannot be read'):
        G.dequantize(np.zeros(18, np.uint8), 99, (1, 32), 'w')
    with pytest.raises(G.GGUFError, match=r'Q4_K \(12\) cannot be written here'):
        G.quantize(np.zeros((1, 256), np.float32), G.TYPE_IDS['Q4_K'])
    with pytest.raises(ValueError, match=r'Q8_0 \[2, 40\] has a last dimension of 40'):
        G.quantize(np.zeros((2, 40), np.float32), G.TYPE_IDS['Q8_0'])
    assert G.tensor_nbytes(8, (4, 64)) == 272
    assert G._fields(np.array([[0x21, 0x43]], np.uint8), 4, 2).tolist() == [[1, 3, 2, 4]]

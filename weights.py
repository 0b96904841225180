"""
GGUF in and out: the file format of llama.cpp, Ollama and LM Studio, read into model.py's classes and written
from them, so a model from there runs here and a model trained here runs there.

    g = read_gguf('SmolLM2-135M-Instruct.Q4_1.gguf')     # metadata and tensor table; the data stays mapped
    model = model_from_gguf(g)                            # our LLaMA in float32, llama.cpp's blocks dequantized
    tok = bpe.Tokenizer.from_gguf(g.metadata)             # its tokenizer and chat template (bpe.py)
    save_gguf(model, 'model.gguf', tok, gguf_type='q8_0') # llama-cli -m model.gguf / Ollama: FROM ./model.gguf

The layout (github.com/ggml-org/ggml, docs/gguf.md), all little-endian:
    'GGUF', version (uint32, 2 or 3), tensor count and metadata count (uint64 each),
    metadata: key (uint64 length + UTF-8), value type (uint32), value (a scalar, a string, or an array:
              item type, uint64 count, items),
    tensor infos: name, n_dims (uint32), dims (uint64 each, fastest-varying first), ggml type (uint32),
              offset (uint64, from the start of the data section),
    padding to general.alignment (default 32), then the data, each tensor at an aligned offset.
Weights are mapped by name onto the Hugging Face layout, so model.py's one loader of HF tensors does the rest:
    llama.cpp stores the rows of Q and K of a 'llama' model interleaved for its rotary kernel (permute, below),
    and GPT-2's Conv1D weights transposed; both are undone here and redone on writing.
This file needs torch, numpy and model.py; the block formats (Q8_0, Q4_K, ...) are in ggml_quants.py.
"""
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from ggml_quants import DEQUANTIZE_TYPES, GGML_TYPES, GGUFError, dequantize, quantize, type_name
from model import PretrainedError, _config_from_hf, _state_from_hf, assign_weights, build_model, hf_state

# metadata value types: id -> struct code of a scalar (8 string and 9 array are read by hand)
VALUE_TYPES = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}
STRING, ARRAY = 8, 9
ARCHITECTURES = ('llama', 'qwen2', 'gpt2')
MAX_DIMS = 4                 # ggml tensors have at most 4 dimensions
DEFAULT_ALIGNMENT = 32

# GGUF tensor name (without blk.N. and .weight/.bias) -> Hugging Face's ({} is the block number)
_LLAMA_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head',
                'attn_norm': 'model.layers.{}.input_layernorm', 'attn_q': 'model.layers.{}.self_attn.q_proj',
                'attn_k': 'model.layers.{}.self_attn.k_proj', 'attn_v': 'model.layers.{}.self_attn.v_proj',
                'attn_output': 'model.layers.{}.self_attn.o_proj',
                'ffn_norm': 'model.layers.{}.post_attention_layernorm', 'ffn_gate': 'model.layers.{}.mlp.gate_proj',
                'ffn_up': 'model.layers.{}.mlp.up_proj', 'ffn_down': 'model.layers.{}.mlp.down_proj'}
_GPT2_NAMES = {'token_embd': 'transformer.wte', 'position_embd': 'transformer.wpe', 'output_norm': 'transformer.ln_f',
               'output': 'lm_head', 'attn_norm': 'transformer.h.{}.ln_1', 'attn_qkv': 'transformer.h.{}.attn.c_attn',
               'attn_output': 'transformer.h.{}.attn.c_proj', 'ffn_norm': 'transformer.h.{}.ln_2',
               'ffn_up': 'transformer.h.{}.mlp.c_fc', 'ffn_down': 'transformer.h.{}.mlp.c_proj'}
NAMES = {'llama': _LLAMA_NAMES, 'qwen2': _LLAMA_NAMES, 'gpt2': _GPT2_NAMES}
_CONV1D = ('attn_qkv', 'attn_output', 'ffn_up', 'ffn_down')  # GPT-2's (in, out) weights, stored (out, in) in GGUF
# ModelConfig.rope_scaling's llama3 settings that Llama 3.1 / 3.2 GGUFs imply by their rope_freqs tensor
_LLAMA3_ROPE = [dict(rope_type='llama3', factor=f, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192) for f in (8.0, 16.0, 32.0)]


@dataclass
class TensorInfo:
    name: str
    type: int          # ggml type id (GGML_TYPES)
    shape: tuple       # numpy order: the slowest dimension first, the reverse of the file's
    offset: int        # absolute, in the file
    nbytes: int


@dataclass
class GGUF:
    path: str
    version: int
    metadata: dict                          # key -> str, int, float, bool or a list of them
    tensors: dict = field(default_factory=dict)  # name -> TensorInfo, in file order
    data: memoryview = None                 # the mapped file

    def tensor(self, name, dtype=torch.float32):
        """The tensor called name, dequantized to float32 (then dtype), as a torch tensor of its numpy shape."""
        info = self.tensors[name]
        raw = np.frombuffer(self.data, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        try:
            x = dequantize(raw, info.type, info.shape, _shown(name))
        except GGUFError as e:
            raise GGUFError(f"{self.path}: {e}") from None
        return torch.from_numpy(x).to(dtype)


class _Cursor:
    """Reads the header's values in order, with a clear error (not a struct.error) when the file ends early."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            raise GGUFError(f"{self.path}: truncated: the file ends inside {what} (byte {self.pos} of "
                            f"{len(self.buf)}); download it again")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code, what):
        start = self.take(struct.calcsize(code), what)
        value = struct.unpack_from('<' + code, self.buf, start)[0]
        # a float32 as the shortest decimal that rounds to it: 1e-05 where the bits say 9.999999747378752e-06
        return float(str(np.float32(value))) if code == 'f' else value

    def string(self, what):
        n = self.scalar('Q', what)
        start = self.take(n, what)
        try:
            return str(self.buf[start:start + n], 'utf-8')
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 text: the file is damaged") from None

    def value(self, kind, what, depth=0):
        if kind in VALUE_TYPES:
            return self.scalar(VALUE_TYPES[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY or depth:  # arrays of arrays exist in the spec but no model uses them
            raise GGUFError(f"{self.path}: {what} has value type {kind}, which is not a GGUF type (or a nested "
                            f"array): the file is damaged or from a newer GGUF version")
        item, n = self.scalar('I', what), self.scalar('Q', what)
        if item in VALUE_TYPES:  # numbers: one numpy read instead of n struct calls (token scores, types)
            size = struct.calcsize(VALUE_TYPES[item])
            start = self.take(n * size, what)
            return np.frombuffer(self.buf, dtype='<' + VALUE_TYPES[item].replace('?', 'b1'), count=n,
                                 offset=start).tolist()
        if n > len(self.buf) - self.pos:  # each item takes a byte at least: refuse a huge count before looping
            self.take(n, what)
        return [self.value(item, what, depth + 1) for _ in range(n)]


def _shown(name):
    """A name from the file as it can stand in a one-line message: escaped where it holds a newline or the like,
    and cut where long (a damaged length can make a key of the whole header)."""
    return name if name.isprintable() and 0 < len(name) <= 80 else repr(name[:80]) + '...' * (len(name) > 80)


def read_gguf(path):
    """The GGUF file at path: its metadata, its tensor table and the mapped data (read_gguf copies nothing)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file (a .gguf from llama.cpp, Ollama or the Hub)")
    with open(path, 'rb') as f:
        if os.path.getsize(path) == 0:
            raise GGUFError(f"{path}: empty file, not GGUF")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch wants writable buffers
    buf = memoryview(mm)
    r = _Cursor(buf, path)
    if bytes(buf[:4]) != b'GGUF':
        raise GGUFError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    r.take(4, 'the magic')
    version = r.scalar('I', 'the version')
    if version not in (2, 3):
        hint = ("a big-endian file: convert it on a little-endian machine" if version > 0xFFFF else
                "version 1 files are from 2023: convert the model again with a current llama.cpp" if version == 1
                else "a newer format than this reader knows")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are): {hint}")
    n_tensors, n_kv = r.scalar('Q', 'the tensor count'), r.scalar('Q', 'the metadata count')
    if n_tensors > len(buf) or n_kv > len(buf):
        raise GGUFError(f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                        f"the file can hold: it is damaged")
    metadata = {}
    for i in range(n_kv):
        key = r.string(f'metadata key {i}')
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {_shown(key)} appears twice: the file is damaged")
        metadata[key] = r.value(r.scalar('I', f'the type of {_shown(key)}'), f'metadata {_shown(key)}')
    alignment = metadata.get('general.alignment', DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):  # (type: true is an int too)
        raise GGUFError(f"{path}: general.alignment is {alignment!r:.40}, not a power of two")
    infos = []
    for i in range(n_tensors):
        name = r.string(f'the name of tensor {i}')
        shown = _shown(name)
        n_dims = r.scalar('I', f'tensor {shown}')
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{path}: tensor {shown} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        dims = [r.scalar('Q', f'tensor {shown}') for _ in range(n_dims)]
        kind, offset = r.scalar('I', f'tensor {shown}'), r.scalar('Q', f'tensor {shown}')
        infos.append((name, shown, dims, kind, offset))
    data_start = -(-r.pos // alignment) * alignment
    g, spans = GGUF(path, version, metadata, data=buf), []
    for name, shown, dims, kind, offset in infos:
        if name in g.tensors:
            raise GGUFError(f"{path}: two tensors are called {shown}: the file is damaged")
        if kind not in DEQUANTIZE_TYPES:
            known = kind in GGML_TYPES
            raise GGUFError(f"{path}: tensor {shown} is {type_name(kind)}, " + (
                "a type this reader cannot dequantize: requantize the model with llama-quantize to Q8_0, Q4_K_M "
                "or F16 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K load)" if known else
                "not a ggml type: the file is damaged or from a newer llama.cpp"))
        tname, block, block_bytes = GGML_TYPES[kind]
        numel = math.prod(dims)
        if dims[0] % block:
            raise GGUFError(f"{path}: tensor {shown} {tname} has rows of {dims[0]}, not a multiple of its block "
                            f"of {block}: the file is damaged")
        nbytes = numel // block * block_bytes
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {shown} starts at offset {offset}, not a multiple of the alignment "
                            f"{alignment}: the file is damaged")
        begin = data_start + offset
        if begin + nbytes > len(buf):
            raise GGUFError(f"{path}: truncated: tensor {shown} ({tname} {dims}) needs bytes {begin}..{begin + nbytes} "
                            f"of a {len(buf)}-byte file; download it again")
        g.tensors[name] = TensorInfo(name, kind, tuple(reversed(dims)), begin, nbytes)
        spans.append((begin, begin + nbytes, shown))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise GGUFError(f"{path}: tensors {a} and {b} overlap: the file is damaged")
    return g


# ----------------------------------------------------------------------------------------------------------
# GGUF -> our model

def permute(w, n_head):
    """llama.cpp's order of Q/K rows for a 'llama' model: within each head, the rotate-half pairs (i, i + hs/2)
    that HF's rotary embedding uses become adjacent rows (2i, 2i+1), as its interleaved rope kernel expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """The inverse of permute: llama.cpp's interleaved rows back to HF's rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _get(meta, key, kind=int, default=None):
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(f"the GGUF has no {key}, which a model of its architecture needs: the file is incomplete")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise GGUFError(f"the GGUF's {key} is {value!r}, not a {kind.__name__}")
    return value


def hf_config_from_gguf(g):
    """The Hugging Face config.json that the file's metadata describes (model.py reads that form)."""
    m = g.metadata
    arch = m.get('general.architecture')
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{g.path}: architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)} are; "
                        f"Mistral, SmolLM, TinyLlama and Llama 2/3 are 'llama')")
    key = lambda k, kind=int, default=None: _get(m, f'{arch}.{k}', kind, default)  # noqa: E731
    vocab = m.get(f'{arch}.vocab_size') or len(m.get('tokenizer.ggml.tokens') or []) or \
        g.tensors['token_embd.weight'].shape[0]
    if arch == 'gpt2':
        return dict(model_type='gpt2', n_layer=key('block_count'), n_head=key('attention.head_count'),
                    n_embd=key('embedding_length'), n_positions=key('context_length'), vocab_size=vocab,
                    n_inner=key('feed_forward_length'), activation_function='gelu_new',
                    layer_norm_epsilon=key('attention.layer_norm_epsilon', float, 1e-5))
    n_embd, n_head = key('embedding_length'), key('attention.head_count')
    if key('rope.dimension_count', int, n_embd // n_head) != n_embd // n_head:
        raise GGUFError(f"{g.path}: rope.dimension_count {key('rope.dimension_count')} is not the head size "
                        f"{n_embd // n_head}: partial rotary embeddings are not supported")
    hf = dict(model_type=arch, num_hidden_layers=key('block_count'), hidden_size=n_embd,
              intermediate_size=key('feed_forward_length'), num_attention_heads=n_head,
              num_key_value_heads=key('attention.head_count_kv', int, n_head), vocab_size=vocab,
              max_position_embeddings=key('context_length'), rms_norm_eps=key('attention.layer_norm_rms_epsilon',
                                                                                float, 1e-5),
              rope_theta=key('rope.freq_base', float, 10000.0), hidden_act='silu', use_sliding_window=False,
              tie_word_embeddings='output.weight' not in g.tensors)
    kind = m.get(f'{arch}.rope.scaling.type', 'none')
    if kind == 'linear':
        hf['rope_scaling'] = dict(rope_type='linear', factor=key('rope.scaling.factor', float))
    elif kind != 'none':
        raise GGUFError(f"{g.path}: rope scaling {kind!r} is not supported (linear, and Llama 3's rope_freqs are)")
    if 'rope_freqs.weight' in g.tensors:  # Llama 3.1/3.2: the per-frequency divisors of their rope scaling
        factors, hs = g.tensor('rope_freqs.weight').double(), n_embd // n_head
        inv = 1.0 / (hf['rope_theta'] ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
        for s in _LLAMA3_ROPE:
            turns = s['original_max_position_embeddings'] * inv / (2 * math.pi)
            keep = ((turns - s['low_freq_factor']) / (s['high_freq_factor'] - s['low_freq_factor'])).clamp(0, 1)
            if torch.allclose(1 / ((1 - keep) / s['factor'] + keep), factors, rtol=1e-4):
                hf['rope_scaling'] = s
                break
        else:
            raise GGUFError(f"{g.path}: its rope_freqs tensor matches none of Llama 3's rope scalings")
    return hf


def hf_state_from_gguf(g, hf):
    """{Hugging Face name: float32 tensor} of the file's weights, Q/K rows and GPT-2's Conv1D layout as in HF."""
    arch, names, state = hf['model_type'], NAMES[hf['model_type']], {}
    for name in g.tensors:
        if name == 'rope_freqs.weight':  # read into the config
            continue
        m = re.fullmatch(r'(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)', name)
        if not m or m[2] not in names or (m[1] is None) != ('{}' not in names[m[2]]):
            raise GGUFError(f"{g.path}: tensor {name} has no place in a {arch} model: the file holds another "
                            f"architecture than its metadata says, or parts this reader does not know")
        w = g.tensor(name)
        if arch == 'llama' and m[2] in ('attn_q', 'attn_k'):
            w = unpermute(w, hf['num_attention_heads'] if m[2] == 'attn_q' else hf['num_key_value_heads'])
        if arch == 'gpt2' and m[2] in _CONV1D and m[3] == 'weight':
            w = w.t()
        state[names[m[2]].format(m[1]) + '.' + m[3]] = w
    if arch == 'gpt2' and 'lm_head.weight' in state:  # llama.cpp's converter repeats GPT-2's tied table as output
        if not torch.equal(state['lm_head.weight'], state['transformer.wte.weight']):
            raise GGUFError(f"{g.path}: a GPT-2 with an untied output head, which our GPT cannot hold")
        del state['lm_head.weight']
    return state


def model_from_gguf(g, block_size=None):
    """Our GPT or LLaMA in eval mode and float32 with the weights of g (a GGUF or a path)."""
    g = read_gguf(g) if not isinstance(g, GGUF) else g
    hf = hf_config_from_gguf(g)
    state = hf_state_from_gguf(g, hf)
    try:
        model = build_model(_config_from_hf(hf, state, block_size), init=False)
        assign_weights(model, _state_from_hf(state, model))
    except PretrainedError as e:
        raise GGUFError(f"{g.path}: {e}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# our model -> GGUF

GGUF_TYPES = {'f32': 0, 'f16': 1, 'bf16': 30, 'q8_0': 8, 'q4_0': 2, 'q4_1': 3, 'q5_0': 6, 'q5_1': 7}
FILE_TYPES = {0: 0, 1: 1, 30: 32, 8: 7, 2: 2, 3: 3, 6: 8, 7: 9}  # ggml type -> general.file_type (LlamaFileType)


def _pack_value(value):
    """(type id, bytes) of a metadata value: ints as uint32 (int32 when negative, 64-bit when large), floats as
    float32, lists by their first item, as llama.cpp's own writer types them."""
    def one(v):
        if isinstance(v, bool):
            return 7, struct.pack('<?', v)
        if isinstance(v, int):
            code, kind = ('I', 4) if 0 <= v < 2 ** 32 else ('i', 5) if -2 ** 31 <= v < 0 else \
                ('Q', 10) if v >= 0 else ('q', 11)
            return kind, struct.pack('<' + code, v)
        if isinstance(v, float):
            return 6, struct.pack('<f', v)
        if isinstance(v, str):
            raw = v.encode('utf-8')
            return STRING, struct.pack('<Q', len(raw)) + raw
        raise GGUFError(f"cannot write the metadata value {v!r} ({type(v).__name__}) to GGUF")
    if not isinstance(value, (list, tuple)):
        return one(value)
    if not value:
        return ARRAY, struct.pack('<IQ', STRING, 0)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):  # one type for the whole array
        kind, code = (5, 'i') if min(value) >= -2 ** 31 and max(value) < 2 ** 31 else (11, 'q')
        return ARRAY, struct.pack('<IQ', kind, len(value)) + np.asarray(value, dtype='<' + code).tobytes()
    if all(isinstance(v, float) for v in value):
        return ARRAY, struct.pack('<IQ', 6, len(value)) + np.asarray(value, dtype='<f4').tobytes()
    items = [one(v) for v in value]
    if len({k for k, _ in items}) > 1:
        raise GGUFError(f"a GGUF array holds one type of value, not a mix: {value[:3]}")
    return ARRAY, struct.pack('<IQ', items[0][0], len(items)) + b''.join(b for _, b in items)


def write_gguf(path, metadata, tensors, alignment=DEFAULT_ALIGNMENT):
    """Write metadata {key: value} and tensors [(name, ggml type, numpy shape, raw uint8 bytes)] as GGUF v3, via
    path.tmp renamed when complete, so a crash never leaves half a file under the real name."""
    metadata = {'general.alignment': alignment, **metadata} if alignment != DEFAULT_ALIGNMENT else metadata
    text = lambda s: struct.pack('<Q', len(s.encode('utf-8'))) + s.encode('utf-8')  # noqa: E731
    head = [b'GGUF', struct.pack('<IQQ', 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        kind, raw = _pack_value(value)
        head += [text(key), struct.pack('<I', kind), raw]
    offset = 0
    for name, kind, shape, raw in tensors:
        head += [text(name), struct.pack('<I', len(shape)), struct.pack(f'<{len(shape)}Q', *reversed(shape)),
                 struct.pack('<IQ', kind, offset)]
        offset += -(-len(raw) // alignment) * alignment
    header = b''.join(head)
    with open(path + '.tmp', 'wb') as f:
        f.write(header + b'\0' * (-len(header) % alignment))
        for _, _, _, raw in tensors:
            f.write(raw)
            f.write(b'\0' * (-len(raw) % alignment))
    os.replace(path + '.tmp', path)


def _hf_to_gguf_names(arch):
    """{HF name pattern with {} for the block: GGUF name pattern}, the inverse of NAMES."""
    return {hf: ('blk.{}.' if '{}' in hf else '') + g for g, hf in NAMES[arch].items()}


def recover_merges(ranks):
    """[(left bytes, right bytes)] in merge order from tiktoken-style ranks {token bytes: rank}, where ids follow
    the merge order (GPT-2, our bpe.py): each token is the merge of the two pieces that BPE with only the
    lower-ranked tokens leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            if ranks.get(parts[best] + parts[best + 1], math.inf) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise GGUFError(f"token {token!r} is not the merge of two lower-ranked tokens, so the tokenizer has no "
                            f"merge list to write")
        merges.append(tuple(parts))
    return merges


def tokenizer_metadata(tok, vocab_size):
    """The tokenizer.* metadata of a bpe.Tokenizer (byte-level BPE: GPT-2's, bpe.py's own, or one read from a
    tokenizer.json or a GGUF), padded to the model's vocab_size with unused tokens as llama.cpp's converter pads."""
    import bpe
    if tok is None:
        raise GGUFError("a character-level (or unknown) tokenizer has no GGUF form, and llama.cpp could not "
                        "encode text without one: train with prepare.py --tokenizer=bpe or gpt2")
    if getattr(tok, 'kind', 'bpe') != 'bpe':
        return tok.gguf_metadata(vocab_size)  # SentencePiece-style: bpe.py writes its own form
    pre = bpe.pre_name(tok.pattern)
    chars = {b: c for c, b in bpe.byte_chars().items()}
    shown = lambda t: ''.join(chars[b] for b in t)  # noqa: E731  (GPT-2's printable stand-ins, as HF's vocab)
    tokens, types = [f'[PAD{i}]' for i in range(vocab_size)], [5] * vocab_size  # 5: unused
    for t, i in tok.ranks.items():
        tokens[i], types[i] = shown(t), 1
    for t, i in tok.special_tokens.items():
        tokens[i], types[i] = t, 3  # control
    if max(list(tok.ranks.values()) + list(tok.special_tokens.values())) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids beyond the model's vocab_size {vocab_size}")
    pairs = sorted(tok.merges, key=tok.merges.get) if tok.merges else recover_merges(tok.ranks)
    meta = {'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': pre, 'tokenizer.ggml.tokens': tokens,
            'tokenizer.ggml.token_type': types, 'tokenizer.ggml.merges': [f'{shown(a)} {shown(b)}' for a, b in pairs],
            'tokenizer.ggml.add_bos_token': bool(getattr(tok, 'add_bos_token', False))}
    for key, i in (('bos', tok.bos_token_id), ('eos', tok.eos_token_id if tok.eos_token_id is not None else
                                              tok.eot_token)):
        if i is not None:
            meta[f'tokenizer.ggml.{key}_token_id'] = i
    if tok.chat_template:
        meta['tokenizer.chat_template'] = tok.chat_template
    return meta


def save_gguf(model, path, tok, gguf_type='f16', name='nanollm'):
    """Write a gpt or llama model and its bpe.Tokenizer as a GGUF file that llama.cpp runs. gguf_type: f32, f16,
    bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 for the 2-D weights (norms and biases stay f32, as llama.cpp keeps
    them); a matrix whose rows do not split into the type's blocks of 32 is written f16 instead."""
    cfg = model.config
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if cfg.model_type == 'bert':
        raise GGUFError("BERT has no GGUF architecture that llama.cpp generates with: export gpt or llama models")
    arch = 'gpt2' if cfg.model_type == 'gpt' else 'qwen2' if cfg.qkv_bias else 'llama'
    if cfg.rope_scaling and cfg.rope_scaling.get('rope_type') != 'linear':
        raise GGUFError(f"rope scaling {cfg.rope_scaling.get('rope_type')!r} has no GGUF metadata form here "
                        f"(linear has)")
    tokenizer = tokenizer_metadata(tok, cfg.vocab_size)  # first: a tokenizer that has no GGUF form fails fast
    hf = hf_state(model)  # {HF name: tensor}, as save_pretrained writes them
    hs, out = cfg.n_embd // cfg.n_head, []
    inverse = _hf_to_gguf_names(arch)
    kind = GGUF_TYPES[gguf_type]
    for key, w in hf.items():
        stem, _, suffix = key.rpartition('.')
        pattern = re.sub(r'\.(\d+)\.', '.{}.', stem, count=1)
        block = re.search(r'\.(\d+)\.', stem)
        if pattern not in inverse:
            raise GGUFError(f"{key} has no GGUF name in a {arch} model")
        gname = inverse[pattern].format(block[1] if block else None) + '.' + suffix
        w = w.detach().float().cpu()
        if arch == 'llama' and gname.endswith(('attn_q.weight', 'attn_k.weight')):
            w = permute(w, cfg.n_head if 'attn_q' in gname else cfg.n_kv_head)
        if arch == 'gpt2' and gname.rpartition('.')[0].split('.')[-1] in _CONV1D and suffix == 'weight':
            w = w.t()
        x = np.ascontiguousarray(w.numpy())
        t = kind if x.ndim == 2 else 0  # vectors (norms, biases) stay f32
        if t not in (0, 1, 30) and x.shape[-1] % GGML_TYPES[t][1]:
            t = 1
        out.append((gname, t, x.shape, quantize(x, t).tobytes()))
    meta = {'general.architecture': arch, 'general.name': name, 'general.file_type': FILE_TYPES[kind],
            f'{arch}.context_length': cfg.block_size, f'{arch}.embedding_length': cfg.n_embd,
            f'{arch}.block_count': cfg.n_layer, f'{arch}.feed_forward_length': cfg.intermediate_size,
            f'{arch}.attention.head_count': cfg.n_head}
    if kind not in (0, 1, 30):
        meta['general.quantization_version'] = 2
    if arch == 'gpt2':
        meta[f'{arch}.attention.layer_norm_epsilon'] = float(cfg.norm_eps)
    else:
        meta.update({f'{arch}.attention.head_count_kv': cfg.n_kv_head, f'{arch}.rope.dimension_count': hs,
                     f'{arch}.attention.layer_norm_rms_epsilon': float(cfg.norm_eps),
                     f'{arch}.rope.freq_base': float(cfg.rope_theta), f'{arch}.vocab_size': cfg.vocab_size})
        if cfg.rope_scaling:
            meta.update({f'{arch}.rope.scaling.type': 'linear',
                         f'{arch}.rope.scaling.factor': float(cfg.rope_scaling['factor'])})
    meta.update(tokenizer)
    write_gguf(os.fspath(path), meta, out)
    return path

"""
Pretrained weights in and out: Hugging Face folders (config.json + safetensors, the Hub) and GGUF files
(llama.cpp, Ollama, LM Studio), read into model.py's classes and written from them, so a model from there runs
here and a model trained here runs there. model.py stays the architecture file; this is its one door.

    model = from_pretrained('gpt2')                       # a Hub name, hf:org/name or a local folder
    save_pretrained(model, 'out-hf')                      # transformers loads it with the same logits
    g = read_gguf('SmolLM2-135M-Instruct.Q4_1.gguf')     # metadata and tensor table; the data stays mapped
    model = model_from_gguf(g)                            # our LLaMA in float32, llama.cpp's blocks dequantized
    tok = bpe.Tokenizer.from_gguf(g.metadata)             # its tokenizer and chat template (bpe.py)
    save_gguf(model, 'model.gguf', tok, gguf_type='q8_0') # llama-cli -m model.gguf / Ollama: FROM ./model.gguf

Three parts: Hugging Face (safetensors read and written by hand, downloads, the renaming onto our modules),
ggml's block formats (vectorised numpy), and GGUF itself. GGUF tensors are renamed to the Hugging Face layout,
so one mapping (_state_from_hf) serves both.

ggml's block formats: a quantized tensor is a run of fixed-size blocks along its last (contiguous) dimension;
each block holds `block` elements in `size` bytes: one or two fp16 scales and packed integer codes. Every
format is written as a numpy structured dtype, so its byte layout reads at a glance and a buffer becomes an
array of blocks with one `view`, no copy. Results are bit for bit those of the `gguf` package (gguf.quants),
which follows ggml's C reference: scales are widened to fp32 first and every product is taken in fp32, in the
same order (for the K formats the sub-block scale is multiplied into the super-block scale before the code is).

    dequantize(data, type_id, shape, name) -> float32 array of `shape` (numpy order: last dim contiguous)
    quantize(x, type_id) -> uint8 array (..., bytes per row), as llama.cpp writes it

The GGUF layout (github.com/ggml-org/ggml, docs/gguf.md), all little-endian:
    'GGUF', version (uint32, 2 or 3), tensor count and metadata count (uint64 each),
    metadata: key (uint64 length + UTF-8), value type (uint32), value (a scalar, a string, or an array:
              item type, uint64 count, items),
    tensor infos: name, n_dims (uint32), dims (uint64 each, fastest-varying first), ggml type (uint32),
              offset (uint64, from the start of the data section),
    padding to general.alignment (default 32), then the data, each tensor at an aligned offset.
llama.cpp stores the rows of Q and K of a 'llama' model interleaved for its rotary kernel (permute, below), and
GPT-2's Conv1D weights transposed; both are undone on reading and redone on writing.
"""
import ctypes
import functools
import json
import math
import mmap
import os
import pathlib
import re
import reprlib
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

import bpe
from configurator import DownloadError, atomic_write, download
from model import ModelConfig, assign_weights, build_model

# ----------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints in and out (config.json + safetensors as on the Hub; requests and tqdm are only
# imported inside the download)

_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
              'BOOL': torch.bool}


class PretrainedError(Exception):
    """A checkpoint that cannot be read, fetched or mapped onto our models; the message says what to do."""


_ST_MAX_HEADER = 100 << 20  # the reference reader's limit: a longer header is damage, not something to read
_INT64 = 2 ** 63  # torch sizes are int64: a shape whose nonzero dims multiply past it makes no tensor, even empty


def _st_int(x):
    return type(x) is int and 0 <= x < _INT64  # type, not isinstance: JSON's true is an int to Python


_shown = bpe.shown  # a name from a file as it can stand in a one-line message


def _st_object(path):
    """json's object_pairs_hook for a header: a name given twice is refused (json would keep one, hiding the other)."""
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise PretrainedError(f"{path}: corrupt safetensors header: the name {_shown(key)} appears twice")
            out[key] = value
        return out
    return hook


def _st_table(header, path, start, size):
    """[(name, dtype, shape, begin, end)] of a parsed header, every entry checked against the format and the
    file's size (the data begins at byte start), so that nothing is mapped before all of it holds."""
    if not isinstance(header, dict):
        raise PretrainedError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop('__metadata__', None)  # (null is what the reference reader reads as none)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise PretrainedError(f"{path}: corrupt safetensors header: __metadata__ is not an object of strings")
    table = []
    for name, info in header.items():
        if not (isinstance(info, dict) and info.keys() == {'dtype', 'shape', 'data_offsets'}
                and isinstance(info['dtype'], str) and info['dtype'] in _ST_DTYPES
                and isinstance(shape := info['shape'], list) and all(map(_st_int, shape))
                and isinstance(span := info['data_offsets'], list) and len(span) == 2 and all(map(_st_int, span))
                and span[0] <= span[1]):
            raise PretrainedError(f"{path}: tensor {_shown(name)} has an unknown dtype or a corrupt entry: "
                                  f"{reprlib.repr(info)}")
        dtype, (begin, end), numel = _ST_DTYPES[info['dtype']], span, 1
        for d in filter(None, shape):  # stops at the first step past int64: a forged shape costs no bignum work
            if (numel := numel * d) >= _INT64:
                raise PretrainedError(f"{path}: tensor {_shown(name)} has an impossible shape {reprlib.repr(shape)}")
        if 0 in shape:
            numel = 0
        if end - begin != numel * dtype.itemsize:
            raise PretrainedError(f"{path}: tensor {_shown(name)} {info['dtype']}{reprlib.repr(shape)} needs "
                                  f"{numel * dtype.itemsize} bytes but its data_offsets span {end - begin}")
        if start + end > size:
            raise PretrainedError(f"{path}: truncated: tensor {_shown(name)} ends at byte {start + end} of a "
                                  f"{size}-byte file")
        table.append((name, dtype, shape, begin, end))
    spans = sorted((begin, end, name) for name, _, _, begin, end in table)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise PretrainedError(f"{path}: corrupt safetensors header: tensors {_shown(a)} and {_shown(b)} overlap")
    return table


def load_safetensors(path):
    """{name: tensor} from a .safetensors file (8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}, '__metadata__'}, raw bytes) as copy-on-write views of the mmapped file: nothing is copied."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8).ljust(8, b'\0'))[0]  # a file under 8 bytes fails the check below
        if 8 + n > size:
            raise PretrainedError(f"{path}: truncated or not safetensors: a {n}-byte header in a {size}-byte file")
        if n > _ST_MAX_HEADER:
            raise PretrainedError(f"{path}: not safetensors: its header length says {n} bytes, over 100 MB")
        try:  # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting exhausts the parser's stack
            header = json.loads(f.read(n).decode('utf-8'), object_pairs_hook=_st_object(path))
        except (ValueError, RecursionError):
            raise PretrainedError(f"{path}: corrupt safetensors header (not JSON)") from None
        table = _st_table(header, path, 8 + n, size)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, so torch.frombuffer does not warn
    return {name: torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=8 + n + begin)
            .view(shape) if end > begin else torch.empty(shape, dtype=dtype)
            for name, dtype, shape, begin, end in table}


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as safetensors (see load_safetensors); metadata: {str: str}. Written to path.tmp and
    renamed when complete, so a crash never leaves half a file under the real name."""
    codes = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {'__metadata__': {str(k): str(v) for k, v in metadata.items()}} if metadata else {}, 0
    # widest dtypes first, as the reference writer does: then every tensor starts aligned to its element size
    order = sorted(tensors, key=lambda k: (-tensors[k].itemsize, k))
    items = [(k, tensors[k].detach().cpu().contiguous()) for k in order]
    for name, t in items:
        if t.dtype not in codes:
            raise PretrainedError(f"{name}: dtype {t.dtype} has no safetensors code")
        header[name] = {'dtype': codes[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_write(path, 'wb') as f:
        f.write(struct.pack('<Q', len(raw)) + raw)
        for _, t in items:
            f.write(ctypes.string_at(t.data_ptr(), t.nbytes))


def _shards(folder):
    """The shard files that model.safetensors.index.json names, each checked to be a path inside folder: with '..'
    or an absolute path, a crafted index would have load and download reach files anywhere."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    try:
        weight_map = json.loads(pathlib.Path(index).read_text(encoding='utf-8')).get('weight_map')
    except (ValueError, RecursionError, AttributeError):  # AttributeError: JSON, but not an object
        raise PretrainedError(f"{index}: corrupt (not a JSON object): download it again") from None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise PretrainedError(f"{index}: corrupt: its weight_map is not an object {{tensor name: shard file}}")
    shards = sorted(set(weight_map.values()))
    for s in shards:  # (Hub shards are plain names; a subfolder is allowed, '\\' and ':' never: Windows reads them)
        if any(c in s for c in '\\:\0') or any(part in ('', '.', '..') for part in s.split('/')):
            raise PretrainedError(f"{index}: shard {_shown(s)} is not a file name inside the folder: refusing it")
    return shards


def load_pretrained_state(folder):
    """The tensors of a Hugging Face model folder: model.safetensors, or the shards that
    model.safetensors.index.json lists, or pytorch_model.bin (read weights-only: unpickling could run code)."""
    path = lambda name: os.path.join(folder, name)
    if os.path.exists(path('model.safetensors')):
        return load_safetensors(path('model.safetensors'))
    if os.path.exists(path('model.safetensors.index.json')):
        shards = _shards(folder)
        if missing := [s for s in shards if not os.path.exists(path(s))]:
            raise PretrainedError(f"{folder}: shards that model.safetensors.index.json lists are missing: {missing}")
        state = {}
        for s in shards:
            for k, v in load_safetensors(path(s)).items():
                if k in state:  # one of the two would be dropped unseen
                    raise PretrainedError(f"{path(s)}: tensor {_shown(k)} is in another shard too: the folder is "
                                          f"damaged")
                state[k] = v
        return state
    if os.path.exists(path('pytorch_model.bin')):
        try:
            state = torch.load(path('pytorch_model.bin'), map_location='cpu', weights_only=True)
        except Exception as e:  # torch's refusal of pickled code, or a damaged file
            why = 'it holds Python objects beyond tensors' if 'Weights only' in str(e) else type(e).__name__
            raise PretrainedError(f"{path('pytorch_model.bin')}: not loadable weights-only ({why}): get the model "
                                  f"as safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PretrainedError(f"{path('pytorch_model.bin')}: not a dict of tensors")
        return state
    raise PretrainedError(f"{folder}: no weights: expected model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")


def hf_download(repo_id, revision='main', cache_dir=None, endpoint=None):
    """Folder <cache>/<org>--<name>/<revision>/ with a Hub model's config.json, weights and tokenizer files, resuming
    interrupted files; once complete it is used without a request. cache: cache_dir, env NANOLLM_CACHE or
    ~/.cache/nanollm/hub; endpoint: env HF_ENDPOINT or the Hub; env HF_TOKEN is sent as a bearer token."""
    endpoint = (endpoint or os.environ.get('HF_ENDPOINT') or 'https://huggingface.co').rstrip('/')
    root = cache_dir or os.environ.get('NANOLLM_CACHE') or os.path.expanduser('~/.cache/nanollm/hub')
    folder = os.path.join(root, repo_id.replace('/', '--'), revision)
    if os.path.exists(os.path.join(folder, '.complete')):
        return folder
    token, url = os.environ.get('HF_TOKEN'), f"{endpoint}/{repo_id}/resolve/{revision}"
    auth = {'Authorization': f'Bearer {token}'} if token else {}

    def get(name, optional=False):  # False: an optional file the repo does not have
        try:  # (shards may sit in subfolders; a dropped connection is resumed where it broke off)
            return bool(download(f'{url}/{name}', os.path.join(folder, name), retries=4, headers=auth))
        except DownloadError as e:
            if e.status == 404 and optional:
                return False
            if not e.answered:
                raise PretrainedError(f"cannot reach {url}/{name} ({e}): offline? download the model folder "
                                      "elsewhere and pass its path") from None
            # (the Hub also answers 401 for a repo that does not exist)
            why = 'access denied: gated or private model? set HF_TOKEN' if e.status in (401, 403) else \
                'not found: no such repo, revision or file' if e.status == 404 else None
            raise PretrainedError(f"{url}/{name}: {e} {why}" if why else f"{url}/{name}: {e}: run again to resume"
                                  ) from None
    get('config.json')
    if not get('model.safetensors', optional=True):
        if get('model.safetensors.index.json', optional=True):
            for shard in _shards(folder):
                get(shard)
        elif not get('pytorch_model.bin', optional=True):
            raise PretrainedError(f"{repo_id}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json'):
        get(name, optional=True)
    open(os.path.join(folder, '.complete'), 'w').close()
    return folder


# our ModelConfig field -> its config.json key, per family (read by from_pretrained, written by save_pretrained)
_HF_COMMON = dict(n_layer='num_hidden_layers', n_head='num_attention_heads', n_embd='hidden_size',
                  vocab_size='vocab_size', block_size='max_position_embeddings', intermediate_size='intermediate_size')
_HF_KEYS = {'gpt': dict(n_layer='n_layer', n_head='n_head', n_embd='n_embd', vocab_size='vocab_size',
                        block_size='n_positions', intermediate_size='n_inner', norm_eps='layer_norm_epsilon'),
            'bert': dict(_HF_COMMON, norm_eps='layer_norm_eps', type_vocab_size='type_vocab_size'),
            'llama': dict(_HF_COMMON, n_kv_head='num_key_value_heads', norm_eps='rms_norm_eps',
                          tie_embeddings='tie_word_embeddings')}
_BASE = {'gpt': 'transformer.', 'llama': 'model.', 'bert': 'bert.'}  # HF's base-model prefix; heads sit outside
_HEADS = ('lm_head.', 'cls.', 'classifier.', 'score.')  # score: decoders' classification head
# in HF checkpoints but not needed: GPT-2's causal-mask buffers, BERT's tied MLM decoder and next-sentence head
_IGNORED = re.compile(r'(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$|position_ids$|'
                      r'^cls\.predictions\.decoder\.weight$|^cls\.seq_relationship\.')
# our key -> HF key (relative to _BASE but for the heads), applied in order; {a,b}: HF tensors stacked row-wise
_RENAMES = {'gpt': [(r'^transformer\.', ''), (r'^classifier\.', 'score.'), (r'\.qkv\.', '.c_attn.'),
                    (r'\.(proj|fc)\.', r'.c_\1.')],
            'llama': [(r'^transformer\.wte', 'embed_tokens'), (r'^classifier\.', 'score.'),
                      (r'^transformer\.ln_f', 'norm'), (r'^transformer\.h\.', 'layers.'), (r'ln_1', 'input_layernorm'),
                      (r'ln_2', 'post_attention_layernorm'), (r'attn\.qkv', 'self_attn.{q,k,v}_proj'),
                      (r'attn\.proj', 'self_attn.o_proj'), (r'mlp\.gate_up', 'mlp.{gate,up}_proj'),
                      (r'mlp\.proj', 'mlp.down_proj')],
            'bert': [(r'^embeddings\.wte', 'embeddings.word_embeddings'), (r'^h\.', 'encoder.layer.'),
                     (r'^embeddings\.wpe', 'embeddings.position_embeddings'), (r'^pooler', 'pooler.dense'),
                     (r'^embeddings\.wtt', 'embeddings.token_type_embeddings'), (r'^mlm_bias', 'cls.predictions.bias'),
                     (r'attn\.qkv', 'attention.self.{query,key,value}'), (r'attn\.proj', 'attention.output.dense'),
                     (r'ln_1', 'attention.output.LayerNorm'), (r'mlp\.fc', 'intermediate.dense'),
                     (r'mlp\.proj', 'output.dense'), (r'ln_2', 'output.LayerNorm'),
                     (r'^mlm_(dense|ln)', r'cls.predictions.transform.\1'), (r'\.ln\.', '.LayerNorm.')]}


def _config_from_hf(hf, state, block_size):
    """Our ModelConfig from config.json and the tensors, or a PretrainedError naming what we do not support."""
    kind = hf.get('model_type')
    ours = {'gpt2': 'gpt', 'bert': 'bert', 'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama'}.get(kind) or \
        ('llama' if any(k.endswith('mlp.gate_proj.weight') for k in state) else None)  # LlamaForCausalLM-like
    if ours is None:
        raise PretrainedError(f"model_type {kind!r} is not supported: gpt2, bert, llama, mistral, qwen2 or other "
                              "LlamaForCausalLM-like weights")
    args = {k: hf[h] for k, h in _HF_KEYS[ours].items() if hf.get(h) is not None}
    heads = ('classifier.weight' in state or 'score.weight' in state)  # BERT's, decoders' sequence classification
    args['num_labels'] = heads * (len(hf.get('id2label') or {}) or hf.get('num_labels', 2))
    trained, act, gpt_act = args['block_size'], hf.get('hidden_act'), hf.get('activation_function')
    if ours == 'gpt':
        problems = [(gpt_act not in ('gelu_new', 'gelu_pytorch_tanh'), f"activation_function {gpt_act!r}")]
    elif ours == 'bert':
        problems = [(act != 'gelu', f"hidden_act {act!r} (only gelu)"),
                    (hf.get('position_embedding_type', 'absolute') != 'absolute', 'position_embedding_type')]
    else:
        block_size = block_size or min(trained, 8192)  # else a 128k-context model builds 128k-row RoPE tables
        rope = {**(hf.get('rope_scaling') or {}), **(hf.get('rope_parameters') or {})}  # transformers 4 and 5
        rope_type, theta = rope.pop('rope_type', rope.pop('type', 'default')), rope.pop('rope_theta', None)
        head_dim, window = hf.get('head_dim'), hf.get('use_sliding_window', True) and hf.get('sliding_window')
        problems = [(rope_type not in ('default', 'linear', 'llama3'), f"rope_type {rope_type!r}"),
                    (head_dim not in (None, args['n_embd'] // args['n_head']), f"head_dim {head_dim} != hidden/heads"),
                    (act != 'silu', f"hidden_act {act!r} (only silu)"), (hf.get('mlp_bias'), 'mlp_bias'),
                    (hf.get('attention_bias') and kind != 'qwen2', 'attention_bias (a bias on o_proj)'),
                    (window and window < block_size, f"sliding_window {window} is shorter than block_size "
                                                     f"{block_size}: pass block_size <= {window}")]
        args.update(bias=False, qkv_bias=any(k.endswith('q_proj.bias') for k in state),
                    rope_theta=theta or hf.get('rope_theta', 10000.0),
                    rope_scaling=None if rope_type == 'default' else {'rope_type': rope_type, **rope})
    problems.append((ours != 'llama' and (block_size or 0) > trained, f"block_size beyond its {trained} positions"))
    for bad, what in problems:
        if bad:
            raise PretrainedError(f"unsupported {kind} checkpoint: {what}")
    return ModelConfig(model_type=ours, **{**args, 'block_size': block_size or trained})


def _hf_names(cfg, keys):
    """(our key, its HF keys, transposed?) for our keys but a tied head; GPT-2's Conv1D weights are (in, out)."""
    out = []
    for key in keys:
        if key == 'lm_head.weight' and cfg.tie_embeddings:
            continue
        name = functools.reduce(lambda n, rule: re.sub(*rule, n), _RENAMES[cfg.model_type], key)  # rules in order
        stack = re.search(r'\{(.*)\}', name)
        names = [name[:stack.start()] + x + name[stack.end():] for x in stack[1].split(',')] if stack else [name]
        out.append((key, names, cfg.model_type == 'gpt' and '.h.' in key and key.endswith('weight')))
    return out


def _state_from_hf(state, model):
    """Our state dict from HF tensors: each of ours must be found (BERT's pooler and MLM head keep their init when
    absent: BertForMaskedLM has no pooler, BertModel no MLM head), each HF tensor must fit unless _IGNORED."""
    cfg, ours, base = model.config, model.state_dict(), _BASE[model.config.model_type]
    sd = {}  # HF names relative to the base model; old names (LayerNorm gamma/beta, decoder.bias) made current
    for k, v in state.items():
        k = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k))
        sd[k.removeprefix(base).replace('predictions.decoder.bias', 'predictions.bias')] = v
    full = lambda n: n if n.startswith(_HEADS) else base + n
    out, missing = {}, []
    for key, names, t in _hf_names(cfg, ours):
        if not all(n in sd for n in names):
            out[key] = ours[key]
            optional = ('pooler.', 'mlm_') + (('lm_head.',) if cfg.num_labels else ())  # *ForSequenceClassification
            missing += [] if key.startswith(optional) else [full(n) for n in names if n not in sd]
            continue
        v = torch.cat([sd.pop(n) for n in names]) if len(names) > 1 else sd.pop(names[0])
        v = (v.t() if t else v)[:cfg.block_size if key.endswith('wpe.weight') else None]  # may be a shorter block
        if v.shape != ours[key].shape:
            raise PretrainedError(f"{full(names[0])} has shape {tuple(v.shape)}, our {key} {tuple(ours[key].shape)}")
        out[key] = v
    extra = [full(k) for k in sd if not _IGNORED.search(k) and not (k == 'lm_head.weight' and cfg.tie_embeddings)]
    for problem, keys in (('lacks {} tensors the model needs', missing), ('has {} tensors with no place', extra)):
        if keys:
            raise PretrainedError(f"checkpoint {problem.format(len(keys))}, e.g. {', '.join(keys[:3])}")
    if 'lm_head.weight' in ours and cfg.tie_embeddings:
        out['lm_head.weight'] = out['transformer.wte.weight']
    return out


def pretrained_folder(name_or_path, cache_dir=None):
    """The local folder of a model folder path, gpt2[-medium|-large|-xl] or (hf:)org/name, downloaded if need be."""
    folder = name_or_path
    if not os.path.isdir(folder):
        short = name_or_path in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
        repo = 'openai-community/' + name_or_path if short else name_or_path.removeprefix('hf:')
        if repo.count('/') != 1 or name_or_path.startswith(('.', '/', '~')):
            raise PretrainedError(f"{name_or_path}: not a model folder, gpt2[-medium|-large|-xl] or Hub org/name")
        folder = hf_download(repo, cache_dir=cache_dir)
    if not os.path.exists(os.path.join(folder, 'config.json')):
        raise PretrainedError(f"{folder}: no config.json: not a Hugging Face model folder")
    return folder


def from_pretrained(name_or_path, block_size=None, dtype=None, cache_dir=None):
    """Our GPT, LLaMA or BERT in eval mode with the weights of name_or_path: a folder with config.json, gpt2[-medium|
    -large|-xl], or org/name (hf:org/name) on the Hub (see hf_download). block_size: the checkpoint's context,
    for the LLaMA family capped at 8192 (RoPE tables and KV caches grow with it). dtype: None = float32."""
    folder = pretrained_folder(name_or_path, cache_dir)
    hf = json.loads(pathlib.Path(folder, 'config.json').read_text())
    state = load_pretrained_state(folder)
    model = build_model(_config_from_hf(hf, state, block_size))
    model.load_state_dict(_state_from_hf(state, model), strict=True)
    return model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32).eval()


def hf_state(model):
    """{Hugging Face name: tensor} of a gpt or llama model, as transformers' GPT2/Llama/Qwen2 checkpoints name and
    shape them (GPT-2's Conv1D weights transposed; a gpt without biases gets zero ones)."""
    cfg, hs, ours, out = model.config, model.config.n_embd // model.config.n_head, model.state_dict(), {}
    if cfg.model_type == 'bert':
        raise PretrainedError("save_pretrained writes gpt and llama models; BERT export is not supported")
    if cfg.model_type == 'gpt' and not cfg.bias:  # zero biases for the norms and linears of blocks and ln_f
        ours.update({k[:-6] + 'bias': v.new_zeros(len(v)) for k, v in list(ours.items()) if '.h.' in k or 'ln_f' in k})
    for key, names, t in _hf_names(cfg, ours):
        sizes = [cfg.n_head * hs] + [cfg.n_kv_head * hs] * 2 if len(names) == 3 else len(ours[key]) // len(names)
        for name, piece in zip(names, ours[key].split(sizes)):
            out[name if name.startswith(_HEADS) else _BASE[cfg.model_type] + name] = piece.t() if t else piece
    return out


def unexportable(cfg, fmt):
    """Why a model of this ModelConfig has no faithful form in fmt ('Hugging Face', 'GGUF'), or None. Both formats
    know only the families' own blocks: GPT-2 (tied head, GELU) and Llama/Qwen2 (SwiGLU); the speedrun switches
    (train.py --qk_norm, --mlp, --logit_softcap, an untied GPT head) would load there as a different model."""
    own = 'swiglu' if cfg.model_type == 'llama' else 'gelu'
    why = ["qk_norm" if cfg.qk_norm else '', f"mlp={cfg.mlp}" if cfg.mlp != own else '',
           f"logit_softcap={cfg.logit_softcap:g}" if cfg.logit_softcap else '',
           "an untied head (tie_embeddings=False)" if cfg.model_type == 'gpt' and not cfg.tie_embeddings else '']
    why = [w for w in why if w]
    if not why:
        return None
    return (f"this {cfg.model_type} model has {', '.join(why)}, which {fmt}'s {cfg.model_type} format cannot "
            f"represent, so it would load there as a different model: keep it as a train.py checkpoint (sample.py, "
            f"eval.py, chat_ui.py and quantize.py read those), or train with the family's defaults to export")


def save_pretrained(model, folder):
    """Write a gpt or llama model as a Hugging Face folder (config.json, model.safetensors with HF names) that
    transformers loads with the same logits. A padded vocabulary stays padded; a gpt without biases gets zero ones.
    A llama with qkv_bias becomes Qwen2, which has exactly q/k/v biases (Llama's attention_bias adds o_proj's)."""
    cfg, hs = model.config, model.config.n_embd // model.config.n_head
    if unexportable(cfg, 'Hugging Face'):
        raise PretrainedError(unexportable(cfg, 'Hugging Face'))
    out = hf_state(model)
    hf = {h: getattr(cfg, k) for k, h in _HF_KEYS[cfg.model_type].items()}
    hf.update(zip(('architectures', 'model_type'), (['GPT2LMHeadModel'], 'gpt2') if cfg.model_type == 'gpt' else
                  (['Qwen2ForCausalLM'], 'qwen2') if cfg.qkv_bias else (['LlamaForCausalLM'], 'llama')))
    hf.update(dict(activation_function='gelu_new', attn_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                   resid_pdrop=cfg.dropout) if cfg.model_type == 'gpt' else
              dict(head_dim=hs, hidden_act='silu', rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling),
              torch_dtype=str(model.transformer.wte.weight.dtype).removeprefix('torch.'))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(out, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(hf, f, indent=2)


# ----------------------------------------------------------------------------------------------------------
# ggml's block formats

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


# ----------------------------------------------------------------------------------------------------------
# GGUF

# metadata value types 8 (string) and 9 (array); the numbers are bpe.GGUF_SCALARS
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


def read_gguf(path):
    """The GGUF file at path: its metadata, its tensor table and the mapped data (read_gguf copies nothing)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file (a .gguf from llama.cpp, Ollama or the Hub)")
    with open(path, 'rb') as f:  # copy-on-write: torch wants writable buffers (mmap cannot map an empty file)
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)) if os.path.getsize(path) else b''
    try:
        return _read_gguf(buf, path)
    except bpe.BPEError as e:  # the header, metadata or tensor table is damaged: bpe.py's reader says how
        raise GGUFError(str(e)) from None


def _read_gguf(buf, path):
    """read_gguf's work on the file's bytes buf; bpe.py reads the header and the metadata."""
    version, n_tensors, metadata, end = bpe.read_gguf_header(buf, path)
    r = bpe.GGUFCursor(buf, path, end)
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
    with atomic_write(path, 'wb') as f:
        f.write(header + b'\0' * (-len(header) % alignment))
        for _, _, _, raw in tensors:
            f.write(raw)
            f.write(b'\0' * (-len(raw) % alignment))


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
    if unexportable(cfg, 'GGUF'):
        raise GGUFError(unexportable(cfg, 'GGUF'))
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

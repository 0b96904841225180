"""GGUF in and out (weights.py): the real SmolLM2 file against transformers, our own models written and read back
with the same logits, the file read by the `gguf` package as llama.cpp would, and every damaged-file error."""
import os
import struct

import numpy as np
import pytest
import torch

import bpe
import weights
from conftest import shared_file
from weights import GGUFError
from model import ModelConfig, build_model
from weights import save_pretrained

SMOLLM = ('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')


@pytest.fixture(scope='module')
def smollm():
    """(the GGUF, our model from it), read once for the module."""
    g = weights.read_gguf(shared_file(*SMOLLM))
    return g, weights.model_from_gguf(g)


def test_smollm2_metadata_and_shapes(smollm):
    g, model = smollm
    cfg = model.config
    assert (g.version, g.metadata['general.architecture'], len(g.tensors)) == (3, 'llama', 272)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.intermediate_size) == \
        (30, 576, 9, 3, 49152, 1536)
    assert cfg.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert cfg.rope_theta == 100000.0 and abs(cfg.norm_eps - 1e-5) < 1e-9
    assert not any(p.is_meta for p in model.parameters()) and model.rope_cos.device.type == 'cpu'


def test_smollm2_matches_transformers(smollm, tmp_path):
    """Our LLaMA from the GGUF against transformers' LlamaForCausalLM on the same dequantized weights (written with
    our HF export): logits of a 64-token prompt within 1e-3, and the same 32 greedy tokens."""
    transformers = pytest.importorskip('transformers')
    _, model = smollm
    save_pretrained(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-3
        prompt = ids[:, :16]
        want = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt),
                           pad_token_id=0)[0, 16:].tolist()
    got = model.generate(prompt, 32, temperature=0)[0, 16:].tolist()
    assert got == want


def test_q_k_permutation_round_trips():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(weights.unpermute(weights.permute(w, 3), 3), w)
    assert not torch.equal(weights.permute(w, 3), w)
    # llama.cpp's order: within a head, row i (first half) and row i + hs/2 become rows 2i and 2i+1
    p = weights.permute(torch.arange(8.0)[:, None], 1)[:, 0].tolist()
    assert p == [0, 4, 1, 5, 2, 6, 3, 7]


# ----------------------------------------------------------------------------------------------------------
# our models out and back in

def tiny(kind, **kw):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=320)
    if kind == 'llama':
        args.update(n_kv_head=2, rope_theta=500000.0, tie_embeddings=False, bias=False)
    model = build_model(ModelConfig(model_type=kind, **{**args, **kw}))
    for p in model.parameters():  # larger weights than the init, so a wrong detail shows in the logits
        p.data.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope='module')
def tok():
    text = open(shared_file('tinyshakespeare.txt')).read()[:20000]
    return bpe.train(text, vocab_size=300, special_tokens=(bpe.ENDOFTEXT,))


@pytest.mark.parametrize('kind,extra', [('gpt', {}), ('llama', {}), ('llama', {'qkv_bias': True}),
                                        ('llama', {'tie_embeddings': True, 'n_kv_head': 4})])
@pytest.mark.parametrize('gguf_type,tol', [('f32', 0.0), ('f16', 2e-2), ('q8_0', 0.15)])
def test_write_then_read_same_logits(tmp_path, tok, kind, extra, gguf_type, tol):
    model = tiny(kind, **extra)
    path = str(tmp_path / 'm.gguf')
    weights.save_gguf(model, path, tok, gguf_type)
    back = weights.model_from_gguf(path)
    assert back.config == model.config
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids)[0], back(ids)[0]
    if tol == 0:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max().item() <= tol * a.abs().max().item()
    assert weights.read_gguf(path).metadata['general.architecture'] == \
        {'gpt': 'gpt2', 'llama': 'qwen2' if extra.get('qkv_bias') else 'llama'}[kind]


def test_gguf_package_reads_our_file(tmp_path, tok):
    """The keys llama.cpp needs to run the file are there, with the types it reads them as."""
    gguf = pytest.importorskip('gguf')
    model = tiny('llama')
    path = str(tmp_path / 'm.gguf')
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    weights.save_gguf(model, path, tok, 'q8_0')
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f['general.architecture'] == 'llama' and f['llama.block_count'] == 2
    assert f['llama.attention.head_count_kv'] == 2 and f['llama.rope.freq_base'] == 500000.0
    assert f['tokenizer.ggml.model'] == 'gpt2' and f['tokenizer.ggml.pre']
    assert len(f['tokenizer.ggml.tokens']) == 320 == len(f['tokenizer.ggml.token_type'])
    assert len(f['tokenizer.ggml.merges']) == len(tok.ranks) - 256
    assert f['tokenizer.ggml.eos_token_id'] == tok.special_tokens[bpe.ENDOFTEXT]
    assert f['tokenizer.chat_template'] == tok.chat_template
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types['blk.0.attn_q.weight'] == 'Q8_0' and types['blk.0.attn_norm.weight'] == 'F32'
    assert types['output.weight'] == 'Q8_0'
    q = next(t for t in r.tensors if t.name == 'blk.0.attn_q.weight')
    w = gguf.quants.dequantize(q.data, q.tensor_type).reshape(64, 64)
    want = weights.permute(model.transformer.h[0].attn.qkv.weight[:64].detach(), 4)
    assert np.abs(w - want.numpy()).max() < 0.01  # llama.cpp's permuted rows, not ours


def test_tokenizer_round_trips_through_gguf(tmp_path, tok):
    path = str(tmp_path / 'm.gguf')
    weights.save_gguf(tiny('gpt'), path, tok, 'f16')
    back = bpe.Tokenizer.from_gguf(weights.read_gguf(path).metadata)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|> 12345 \u00e9\u4e2d"
    assert back.encode(text, allowed_special='all') == tok.encode(text, allowed_special='all')
    assert back.eos_token_id == tok.special_tokens[bpe.ENDOFTEXT]


def test_refuses_what_it_cannot_write(tmp_path, tok):
    with pytest.raises(GGUFError, match='gguf_type must be one of'):
        weights.save_gguf(tiny('gpt'), str(tmp_path / 'm.gguf'), tok, 'q3_k')
    with pytest.raises(GGUFError, match='character-level'):
        weights.save_gguf(tiny('gpt'), str(tmp_path / 'm.gguf'), None, 'f16')
    with pytest.raises(GGUFError, match='BERT'):
        weights.save_gguf(build_model(ModelConfig(model_type='bert', n_layer=1, n_head=2, n_embd=32,
                                                  vocab_size=300)), str(tmp_path / 'm.gguf'), tok, 'f16')
    assert not os.path.exists(tmp_path / 'm.gguf') and not os.path.exists(tmp_path / 'm.gguf.tmp')


# ----------------------------------------------------------------------------------------------------------
# damaged and unsupported files: one line that names the problem

def small_file(tmp_path, metadata=None, tensors=None):
    path = str(tmp_path / 'x.gguf')
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    weights.write_gguf(path, metadata or {'general.architecture': 'llama'},
                       tensors or [('token_embd.weight', 0, x.shape, x.tobytes())])
    return path


def patched(path, offset, raw):
    data = bytearray(open(path, 'rb').read())
    data[offset:offset + len(raw)] = raw
    open(path, 'wb').write(bytes(data))
    return path


def test_reads_what_it_wrote(tmp_path):
    meta = {'a.str': 'héllo', 'a.int': 7, 'a.neg': -3, 'a.big': 2 ** 40, 'a.float': 0.5, 'a.bool': True,
            'a.strs': ['x', 'y'], 'a.ints': [1, -2, 3], 'a.floats': [0.25, 1.5], 'general.architecture': 'llama'}
    g = weights.read_gguf(small_file(tmp_path, meta))
    assert g.metadata == meta
    assert torch.equal(g.tensor('token_embd.weight'), torch.arange(64.0).reshape(2, 32))


def test_error_bad_magic(tmp_path):
    with pytest.raises(GGUFError, match=r"not a GGUF file \(it starts with b'GGML'"):
        weights.read_gguf(patched(small_file(tmp_path), 0, b'GGML'))
    (tmp_path / 'empty.gguf').write_bytes(b'')
    with pytest.raises(GGUFError, match='empty file'):
        weights.read_gguf(str(tmp_path / 'empty.gguf'))
    with pytest.raises(GGUFError, match='no such file'):
        weights.read_gguf(str(tmp_path / 'missing.gguf'))


@pytest.mark.parametrize('version,hint', [(1, 'version 1 files'), (4, 'newer format'), (0x03000000, 'big-endian')])
def test_error_version(tmp_path, version, hint):
    with pytest.raises(GGUFError, match=f'GGUF version {version} is not supported.*{hint}'):
        weights.read_gguf(patched(small_file(tmp_path), 4, struct.pack('<I', version)))


@pytest.mark.parametrize('cut', [10, 40, 200, -8])
def test_error_truncated(tmp_path, cut):
    path = small_file(tmp_path)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:cut])
    with pytest.raises(GGUFError, match='truncated'):
        weights.read_gguf(path)


def test_error_unsupported_architecture(tmp_path):
    g = weights.read_gguf(small_file(tmp_path, {'general.architecture': 'mamba'}))
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported.*llama, qwen2, gpt2"):
        weights.model_from_gguf(g)


def test_error_unsupported_or_unknown_quant_type(tmp_path):
    raw = bytes(66 * 2)  # two IQ2_XXS blocks of 256
    path = small_file(tmp_path, tensors=[('token_embd.weight', 16, (2, 256), raw)])
    with pytest.raises(GGUFError, match='IQ2_XXS, a type this reader cannot dequantize: requantize'):
        weights.read_gguf(path)
    path = small_file(tmp_path, tensors=[('token_embd.weight', 99, (2, 32), bytes(256))])
    with pytest.raises(GGUFError, match='unknown type 99, not a ggml type'):
        weights.read_gguf(path)


def test_error_tensor_size_does_not_match_its_type(tmp_path):
    # Q8_0 rows of 48 values do not split into blocks of 32
    path = small_file(tmp_path, tensors=[('token_embd.weight', 8, (2, 48), bytes(34 * 3))])
    with pytest.raises(GGUFError, match='rows of 48, not a multiple of its block of 32'):
        weights.read_gguf(path)
    # a tensor table whose sizes run past the data: the next tensor would overlap this one
    x = np.zeros((2, 32), np.float32).tobytes()
    path = small_file(tmp_path, tensors=[('a.weight', 0, (2, 32), x), ('b.weight', 0, (2, 32), x)])
    data = open(path, 'rb').read()
    at = data.index(b'b.weight') + len(b'b.weight') + 4 + 16 + 4  # b's offset field
    with pytest.raises(GGUFError, match='overlap'):
        weights.read_gguf(patched(path, at, struct.pack('<Q', 64)))


def test_error_damaged_metadata(tmp_path):
    path = small_file(tmp_path, {'general.architecture': 'llama', 'x': 'abc'})
    data = open(path, 'rb').read()
    with pytest.raises(GGUFError, match='not UTF-8'):
        weights.read_gguf(patched(path, data.index(b'abc'), b'\xff\xfe\xfd'))
    path = small_file(tmp_path, {'general.architecture': 'llama', 'x': 5})
    data = open(path, 'rb').read()
    with pytest.raises(GGUFError, match='value type 77'):
        weights.read_gguf(patched(path, data.index(b'x') + 1, struct.pack('<I', 77)))
    with pytest.raises(GGUFError, match='more than the file can hold'):
        weights.read_gguf(patched(path, 8, struct.pack('<Q', 2 ** 60)))


def test_error_missing_architecture_key(tmp_path):
    g = weights.read_gguf(small_file(tmp_path, {'general.architecture': 'llama'}))
    with pytest.raises(GGUFError, match=r'the GGUF has no llama\.\w+, which a model of its architecture needs'):
        weights.model_from_gguf(g)


@pytest.mark.parametrize('kind,extra', [('gpt', {}), ('llama', {}), ('llama', {'qkv_bias': True})])
def test_llama_cpp_generates_what_we_generate(tmp_path, tok, kind, extra):
    """Our file in llama.cpp itself (not a CI dependency: set LLAMA_CPP_BIN to a folder with llama-simple, e.g. a
    cmake build of the llama-cpp-python source package): the same greedy text as our generate."""
    import subprocess
    binary = os.path.join(os.environ.get('LLAMA_CPP_BIN', ''), 'llama-simple')
    if not os.path.isfile(binary):
        pytest.skip('set LLAMA_CPP_BIN to a folder with llama.cpp\'s llama-simple to run our GGUF files in it')
    torch.manual_seed(0)  # weights of a trained model's size: tiny()'s large ones make near-ties that flip greedy picks
    model = build_model(ModelConfig(model_type=kind, n_layer=2, n_head=4, n_embd=128, vocab_size=320, block_size=256,
                                    **extra)).eval()
    path = str(tmp_path / 'm.gguf')
    weights.save_gguf(model, path, tok, 'f32')
    prompt = 'ROMEO: What light through yonder window'
    ids = tok.encode(prompt)
    ours = tok.decode(model.generate([ids], 12, temperature=0)[0][len(ids):])
    r = subprocess.run([binary, '-m', path, '-n', '12', prompt], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors='replace')[-500:]
    assert r.stdout.decode('utf-8', 'replace').rstrip('\n').endswith(ours)

"""Hugging Face checkpoints in and out: our models against transformers' tiny random ones (same logits both
ways), the hand-written safetensors reader and writer, and hf_download against a local HTTP server."""
import http.server
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import threading

import pytest
import torch

from model import ModelConfig, build_model
from weights import PretrainedError, from_pretrained, hf_download, load_pretrained_state, load_safetensors, save_pretrained, save_safetensors

transformers = pytest.importorskip('transformers')

# initializer_range 0.2, not 0.02: bigger logits, so a wrong detail (say, a missing RoPE scaling) shows far above
# the 1e-4 tolerance
LLAMA = dict(initializer_range=0.2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
BERT = dict(initializer_range=0.2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=100, max_position_embeddings=64)
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16, 'rope_theta': 500000.0}


def hf_model(kind):
    T = transformers
    torch.manual_seed(0)
    if kind == 'gpt2':
        return T.GPT2LMHeadModel(T.GPT2Config(initializer_range=0.2, n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                              n_positions=64))
    if kind == 'llama':  # grouped-query attention, Llama 3's RoPE base, untied head
        return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA, rope_theta=500000.0, tie_word_embeddings=False))
    if kind == 'llama3':
        return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA, rope_scaling=LLAMA3, tie_word_embeddings=True))
    if kind == 'llama-linear':
        return T.LlamaForCausalLM(T.LlamaConfig(**LLAMA, rope_scaling={'rope_type': 'linear', 'factor': 4.0}))
    if kind == 'mistral':  # its 4096-token sliding window is longer than the context: plain attention
        return T.MistralForCausalLM(T.MistralConfig(**LLAMA))
    if kind == 'bert-cls':  # pooler and classifier, no MLM head
        return T.BertForSequenceClassification(T.BertConfig(**BERT, num_labels=3))
    if kind == 'qwen2':  # q/k/v biases, tied head
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA, tie_word_embeddings=True))
        for n, p in model.named_parameters():
            if n.endswith('proj.bias'):  # transformers initialises them to zero: make them count
                torch.nn.init.normal_(p, std=0.5)
        return model
    return T.BertForMaskedLM(T.BertConfig(**BERT))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """kind -> (folder with the saved HF model, the HF model in eval mode), built once for the module."""
    out = {}
    for kind in ('gpt2', 'llama', 'llama3', 'llama-linear', 'mistral', 'qwen2', 'bert', 'bert-cls'):
        model = hf_model(kind).eval()
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (str(folder), model)
    return out


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize('kind', ['gpt2', 'llama', 'llama3', 'llama-linear', 'mistral', 'qwen2'])
def test_causal_lm_logits_match_transformers(saved, kind):
    folder, ref = saved[kind]
    ours = from_pretrained(folder)
    assert not ours.training and ours.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(0, 100, (2, 40))  # past llama3's original 16 positions, where the scaling matters
    logits, loss = ours(idx)
    assert loss is None and max_diff(logits, ref(idx).logits) < 1e-4


@torch.no_grad()
def test_bert_mlm_logits_match_transformers_with_padding(saved):
    folder, ref = saved['bert']
    ours = from_pretrained(folder)  # BertForMaskedLM has no pooler: ours keeps its init
    idx = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    types = torch.zeros_like(idx)
    types[:, 6:] = 1
    logits, _ = ours(idx, token_type_ids=types, attention_mask=mask)
    assert max_diff(logits, ref(idx, attention_mask=mask, token_type_ids=types).logits) < 1e-4


@torch.no_grad()
def test_bert_classifier_and_old_layernorm_names(saved, tmp_path):
    folder, ref = saved['bert-cls']
    old = {re.sub(r'LayerNorm\.weight$', 'LayerNorm.gamma', re.sub(r'LayerNorm\.bias$', 'LayerNorm.beta', k)): v
           for k, v in load_pretrained_state(folder).items()}  # TF-era checkpoints name the norms gamma and beta
    save_safetensors(old, str(tmp_path / 'model.safetensors'))
    shutil.copy(os.path.join(folder, 'config.json'), tmp_path)
    ours = from_pretrained(str(tmp_path))
    assert ours.config.num_labels == 3
    idx, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[0, 5:] = 0
    logits, _ = ours.classify(idx, attention_mask=mask)
    assert max_diff(logits, ref(idx, attention_mask=mask).logits) < 1e-4


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
@torch.no_grad()
def test_decoder_sequence_classification_matches_transformers(tmp_path, kind):
    # GPT2/LlamaForSequenceClassification: a bias-free 'score' head on the last non-padding token; the Llama one
    # has no lm_head at all (it keeps its initialisation in ours)
    T = transformers
    torch.manual_seed(0)
    if kind == 'gpt2':
        ref = T.GPT2ForSequenceClassification(T.GPT2Config(initializer_range=0.2, n_layer=2, n_head=2, n_embd=32,
                                                           vocab_size=100, n_positions=64, num_labels=3, pad_token_id=0))
    else:
        ref = T.LlamaForSequenceClassification(T.LlamaConfig(**LLAMA, num_labels=3, pad_token_id=0,
                                                             tie_word_embeddings=False))
    ref.eval().save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    assert ours.config.num_labels == 3 and ours.classifier.bias is None
    idx = torch.randint(1, 100, (3, 12))
    idx[0, 5:] = 0  # right padding with the pad token, which is how transformers finds the last real token
    idx[2, 9:] = 0
    logits, _ = ours.classify(idx, attention_mask=idx != 0)
    assert max_diff(logits, ref(idx).logits) < 1e-4


@torch.no_grad()
def test_block_size_and_dtype(saved):
    folder, ref = saved['gpt2']
    ours = from_pretrained(folder, block_size=16, dtype=torch.bfloat16)
    assert ours.config.block_size == 16 and ours.transformer.wpe.weight.shape == (16, 32)
    assert ours.transformer.wte.weight.dtype == torch.bfloat16
    with pytest.raises(PretrainedError, match='block_size beyond its 64 positions'):
        from_pretrained(folder, block_size=128)


def randomized(config):
    torch.manual_seed(1)
    model = build_model(config)
    for p in model.parameters():  # biases and norm gains too, so every tensor's place is tested
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize('kw', [
    dict(model_type='gpt', vocab_size=128),                # padded vocabulary stays padded
    dict(model_type='gpt', vocab_size=96, bias=False),     # written with zero biases
    dict(model_type='llama', n_kv_head=2, tie_embeddings=False, rope_theta=500000.0),
    dict(model_type='llama', n_kv_head=2, qkv_bias=True),  # written as Qwen2
    dict(model_type='llama', rope_scaling={k: v for k, v in LLAMA3.items() if k != 'rope_theta'}),
], ids=['gpt', 'gpt-nobias', 'llama-gqa-untied', 'llama-qkv-bias', 'llama3-rope'])
def test_save_pretrained_loads_in_transformers(tmp_path, kw):
    config = ModelConfig(**{**dict(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_embd=32), **kw})
    ours = randomized(config)
    save_pretrained(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == ('Qwen2ForCausalLM' if config.qkv_bias else
                                  'GPT2LMHeadModel' if config.model_type == 'gpt' else 'LlamaForCausalLM')
    idx = torch.randint(0, config.vocab_size, (2, 40))
    assert max_diff(ours(idx)[0], ref(idx).logits) < 1e-4
    assert max_diff(ours(idx)[0], from_pretrained(tmp_path)(idx)[0]) < 1e-5  # and back into ours


def test_safetensors_round_trip(tmp_path):
    import safetensors
    tensors = {'bf16': torch.randn(3, 5).to(torch.bfloat16), 'f16': torch.randn(7).half(), 'f32': torch.randn(2, 3),
               'f64': torch.randn(4).double(), 'i64': torch.arange(5), 'i32': torch.arange(3, dtype=torch.int32),
               'i8': torch.tensor([-3, 4], dtype=torch.int8), 'u8': torch.tensor([250], dtype=torch.uint8),
               'bool': torch.tensor([True, False, True]), 'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 4),
               'strided': torch.randn(4, 6).t()}
    path = str(tmp_path / 'x.safetensors')
    save_safetensors(tensors, path, metadata={'format': 'pt', 'step': 7})
    assert not os.path.exists(path + '.tmp')
    n = struct.unpack('<Q', pathlib.Path(path).read_bytes()[:8])[0]
    assert n % 8 == 0  # header padded: the data starts 8-byte aligned
    back = load_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safetensors.safe_open(path, 'pt') as f:  # the reference reader agrees, metadata included
        assert f.metadata() == {'format': 'pt', 'step': '7'}
        assert torch.equal(f.get_tensor('bf16'), tensors['bf16'])


def test_safetensors_errors(tmp_path):
    path = str(tmp_path / 'x.safetensors')
    save_safetensors({'a': torch.randn(64, 64), 'b': torch.randn(64)}, path)
    data = pathlib.Path(path).read_bytes()
    bad = str(tmp_path / 'bad.safetensors')

    def load(raw):
        with open(bad, 'wb') as f:
            f.write(raw)
        return load_safetensors(bad)

    with pytest.raises(PretrainedError, match=r'truncated: tensor a ends at byte \d+ of a \d+-byte file'):
        load(data[:len(data) // 2])
    with pytest.raises(PretrainedError, match='truncated or not safetensors: a 1000000-byte header in a 10-byte file'):
        load(struct.pack('<Q', 10 ** 6) + b'{}')
    with pytest.raises(PretrainedError, match='truncated or not safetensors: .* in a 3-byte file'):
        load(b'abc')
    n = struct.unpack('<Q', data[:8])[0]
    with pytest.raises(PretrainedError, match='corrupt safetensors header'):
        load(data[:8] + b'\xff' + data[9:])
    header = json.loads(data[8:8 + n])

    def with_header(**changes):
        h = {**header, 'b': {**header['b'], **changes}}
        raw = json.dumps(h).encode()
        return load(struct.pack('<Q', len(raw)) + raw + data[8 + n:])

    with pytest.raises(PretrainedError, match="tensor b has an unknown dtype or a corrupt entry: .*'F99'"):
        with_header(dtype='F99')
    with pytest.raises(PretrainedError, match=r'tensor b F32\[65\] needs 260 bytes but its data_offsets span 256'):
        with_header(shape=[65])
    with pytest.raises(PretrainedError, match='unknown dtype or a corrupt entry'):
        with_header(data_offsets=None)


def test_pytorch_bin_and_sharded_folders(saved, tmp_path):
    folder, ref = saved['gpt2']
    idx = torch.randint(0, 100, (1, 10))
    want = ref(idx).logits.detach()
    (tmp_path / 'bin').mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), tmp_path / 'bin')
    # as in openai-community/gpt2: no transformer. prefix, the causal-mask buffers saved, the tied lm_head.weight
    old = {k.removeprefix('transformer.'): v for k, v in ref.state_dict().items()}
    torch.save({**old, 'h.0.attn.bias': torch.ones(1, 1, 64, 64)}, tmp_path / 'bin' / 'pytorch_model.bin')
    assert max_diff(from_pretrained(str(tmp_path / 'bin'))(idx)[0], want) < 1e-4
    # two safetensors shards and their index, as large models come
    state = load_pretrained_state(folder)
    names = sorted(state)
    (tmp_path / 'sharded').mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), tmp_path / 'sharded')
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f'model-{i + 1:05d}-of-00002.safetensors'
        save_safetensors({k: state[k] for k in part}, str(tmp_path / 'sharded' / shard))
        weight_map.update({k: shard for k in part})
    (tmp_path / 'sharded' / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    assert max_diff(from_pretrained(str(tmp_path / 'sharded'))(idx)[0], want) < 1e-4
    os.remove(tmp_path / 'sharded' / shard)
    with pytest.raises(PretrainedError, match=r'lists are missing: \[.model-00002-of-00002.safetensors.\]'):
        load_pretrained_state(str(tmp_path / 'sharded'))
    with pytest.raises(PretrainedError, match='no weights: expected model.safetensors'):
        load_pretrained_state(str(tmp_path))


def edited_copy(saved, kind, tmp_path, config=None, state=None):
    folder = saved[kind][0]
    os.makedirs(tmp_path, exist_ok=True)
    hf = json.loads(pathlib.Path(folder, 'config.json').read_text())
    hf.update(config or {})
    (tmp_path / 'config.json').write_text(json.dumps(hf))
    weights = load_pretrained_state(folder)
    save_safetensors(state(weights) if state else weights, str(tmp_path / 'model.safetensors'))
    return str(tmp_path)


@pytest.mark.parametrize('config,message', [
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}}, "rope_type 'yarn'"),
    ({'hidden_act': 'gelu'}, "hidden_act 'gelu'"),
    ({'head_dim': 16}, 'head_dim 16'),
    ({'mlp_bias': True}, 'mlp_bias'),
    ({'model_type': 'mistral', 'sliding_window': 32}, 'sliding_window 32 is shorter than block_size 64'),
    ({'model_type': 'gemma', 'architectures': ['GemmaForCausalLM']}, None),
])
def test_unsupported_llama_configs(saved, tmp_path, config, message):
    folder = edited_copy(saved, 'llama', tmp_path, config)
    if message is None:  # an unknown model_type with LlamaForCausalLM-like weights still loads
        assert from_pretrained(folder).config.model_type == 'llama'
        return
    with pytest.raises(PretrainedError, match=message):
        from_pretrained(folder)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    drop = lambda s: {k: v for k, v in s.items() if 'layers.1.mlp.up_proj' not in k}
    with pytest.raises(PretrainedError, match='lacks 1 tensors .* model.layers.1.mlp.up_proj.weight'):
        from_pretrained(edited_copy(saved, 'llama', tmp_path / 'a', state=drop))
    extra = lambda s: {**s, 'model.layers.0.self_attn.o_proj.bias': torch.zeros(32)}
    with pytest.raises(PretrainedError, match='with no place, e.g. model.layers.0.self_attn.o_proj.bias'):
        from_pretrained(edited_copy(saved, 'llama', tmp_path / 'b', state=extra))
    with pytest.raises(PretrainedError, match='not a model folder'):
        from_pretrained('./no/such/folder')


# ---- the Hub, played by a local HTTP server

class Hub(http.server.BaseHTTPRequestHandler):
    files = {}       # URL path -> bytes
    requests = []    # (path, Range header, Authorization header) of every request
    cut = set()      # paths whose next response stops half-way

    def do_GET(self):
        self.requests.append((self.path, self.headers.get('Range'), self.headers.get('Authorization')))
        if self.path.startswith('/gated/'):
            return self.send_error(401)
        data = self.files.get(self.path)
        if data is None:
            return self.send_error(404)
        start = int(self.headers['Range'].removeprefix('bytes=').rstrip('-')) if self.headers.get('Range') else 0
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(data) - start))
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        if self.path in self.cut:  # HTTP/1.0: the connection closes when we return, short of Content-Length
            self.cut.discard(self.path)
            return self.wfile.write(data[start:start + (len(data) - start) // 2])
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def hub(saved):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = saved['gpt2'][0]
    for repo in ('org/tiny', 'openai-community/gpt2'):
        for name in os.listdir(folder):
            Hub.files[f'/{repo}/resolve/main/{name}'] = pathlib.Path(folder, name).read_bytes()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_ENDPOINT', hub)
    monkeypatch.setenv('NANOLLM_CACHE', str(tmp_path))
    monkeypatch.delenv('HF_TOKEN', raising=False)
    Hub.requests.clear()
    return tmp_path


@torch.no_grad()
def test_hub_download_then_cache(saved, env):
    ref = saved['gpt2'][1]
    idx = torch.randint(0, 100, (1, 10))
    assert max_diff(from_pretrained('hf:org/tiny')(idx)[0], ref(idx).logits) < 1e-4
    got = {p.rsplit('/', 1)[1] for p, _, _ in Hub.requests}
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json'} <= got  # 404s are fine
    folder = env / 'org--tiny' / 'main'
    assert (folder / 'model.safetensors').read_bytes() == Hub.files['/org/tiny/resolve/main/model.safetensors']
    assert not list(folder.glob('*.part'))
    Hub.requests.clear()
    from_pretrained('org/tiny')
    assert Hub.requests == []  # the second time, no network at all
    from_pretrained('gpt2')  # short names are the openai-community repos
    assert Hub.requests[0][0] == '/openai-community/gpt2/resolve/main/config.json'


def test_hub_download_resumes(env, monkeypatch):
    url = '/org/tiny/resolve/main/model.safetensors'
    Hub.cut.add(url)  # the first response breaks off half-way: the retry asks for the rest
    monkeypatch.setenv('HF_TOKEN', 'secret')
    folder = hf_download('org/tiny')
    ranges = [r for p, r, _ in Hub.requests if p == url]
    assert ranges[0] is None and ranges[1] == f'bytes={len(Hub.files[url]) // 2}-'
    assert pathlib.Path(folder, 'model.safetensors').read_bytes() == Hub.files[url]
    assert all(auth == 'Bearer secret' for _, _, auth in Hub.requests)
    # a part left by an earlier, killed run is continued, not restarted
    Hub.requests.clear()
    part = env / 'other'
    os.makedirs(part / 'org--tiny' / 'main')
    (part / 'org--tiny' / 'main' / 'model.safetensors.part').write_bytes(Hub.files[url][:1000])
    hf_download('org/tiny', cache_dir=str(part))
    assert [r for p, r, _ in Hub.requests if p == url] == ['bytes=1000-']
    assert (part / 'org--tiny' / 'main' / 'model.safetensors').read_bytes() == Hub.files[url]


def test_hub_errors(env, monkeypatch):
    with pytest.raises(PretrainedError, match=r'HTTP 404 not found: no such repo'):
        hf_download('org/missing')
    with pytest.raises(PretrainedError, match=r'HTTP 401 access denied: gated or private model\? set HF_TOKEN'):
        hf_download('gated/model')
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{port}')
    with pytest.raises(PretrainedError, match=rf'cannot reach http://127.0.0.1:{port}/org/x/.*offline\? download '
                                              'the model folder elsewhere and pass its path'):
        from_pretrained('hf:org/x')


def test_one_downloader_retry_rules(env, monkeypatch, tmp_path):
    """configurator.download serves the Hub and prepare.py alike: a break-off resumes at once, with no sleep; a
    server that never answered, or a 4xx, is not retried, so offline users hear so at once."""
    import time
    from configurator import DownloadError, download
    slept = []
    monkeypatch.setattr(time, 'sleep', slept.append)
    url = '/org/tiny/resolve/main/model.safetensors'
    Hub.cut.add(url)
    dest = download(os.environ['HF_ENDPOINT'] + url, str(tmp_path / 'a' / 'w.bin'), retries=1)
    assert pathlib.Path(dest).read_bytes() == Hub.files[url] and slept == []
    with pytest.raises(DownloadError) as e:
        download(os.environ['HF_ENDPOINT'] + '/nope', str(tmp_path / 'b'), retries=3)
    assert (e.value.status, e.value.answered, str(e.value)) == (404, True, 'HTTP 404') and slept == []
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as e:
        download(f'http://127.0.0.1:{port}/x', str(tmp_path / 'c'), retries=3)
    assert (e.value.status, e.value.answered, slept) == (None, False, [])
    assert not os.path.exists(tmp_path / 'b.part') and not os.path.exists(tmp_path / 'c.part')

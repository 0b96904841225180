"""CPU inference through PackedLinear (model.pack_linears, which generate applies itself): the same logits and greedy
tokens as nn.Linear in fp32 and bf16, never a stale packed copy after the weights change, and training untouched."""
import copy
import io

import pytest
import torch

import model as M
from model import ModelConfig, build_model, pack_linears

pytestmark = pytest.mark.skipif(not M.CAN_PACK, reason="this PyTorch has no oneDNN")

# bf16 weights take oneDNN's bf16 kernels where this CPU has them; the fp32-copy path runs everywhere
BF16_PATHS = sorted({False, M.ONEDNN_BF16})


def tiny(model_type='llama', dtype=torch.float32):
    torch.manual_seed(0)
    kw = {'n_kv_head': 2} if model_type == 'llama' else {}
    cfg = ModelConfig(model_type=model_type, n_layer=2, n_head=4, n_embd=64, vocab_size=97, block_size=64, **kw)
    return build_model(cfg).eval().to(dtype)


def stock(model):
    return pack_linears(copy.deepcopy(model), False)


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


X = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
LONG = torch.randint(0, 97, (9, 60), generator=torch.Generator().manual_seed(2))  # 540 rows: MKL's matmul


@pytest.mark.parametrize('model_type', ['gpt', 'llama'])
def test_fp32_same_logits_and_greedy_tokens(model_type):
    fast = tiny(model_type)
    ref = stock(fast)
    assert torch.equal(fast.generate(X, 30, temperature=0), ref.generate(X, 30, temperature=0))
    assert all(type(m) is M.PackedLinear and 'packed' in m.__dict__ for m in linears(fast))
    assert all(type(m) is torch.nn.Linear for m in linears(ref))
    with torch.no_grad():
        for x in (X, X[:1, :1], LONG):  # many rows (prefill, batches), one row, a long prompt
            assert torch.allclose(fast(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('onednn_bf16', BF16_PATHS)
@pytest.mark.parametrize('model_type', ['gpt', 'llama'])
def test_bf16_same_logits_and_greedy_tokens(model_type, onednn_bf16, monkeypatch):
    monkeypatch.setattr(M, 'ONEDNN_BF16', onednn_bf16)
    fast = tiny(model_type, torch.bfloat16)
    ref = stock(fast)
    out = fast.generate(X, 30, temperature=0)
    assert out.shape == (3, 40)
    with torch.no_grad():
        for x in (X, X[:1, :1], X[:1], LONG):  # many rows, the one row of batch-1 decoding, a long prompt
            assert torch.allclose(fast(x)[0].float(), ref(x)[0].float(), atol=3e-2, rtol=3e-2)
        # greedy under rounding: each new token is (within bf16 rounding) the stock model's argmax on that prefix
        logits = ref(out[:, :-1])[0][:, 9:].float()  # (B, 30, V): predictions of the 30 new tokens
    chosen = logits.gather(-1, out[:, 10:, None]).squeeze(-1)
    assert (logits.max(-1).values - chosen).max() < 0.05
    assert all(m.__dict__['packed'][4] == (torch.bfloat16 if onednn_bf16 else torch.float32) for m in linears(fast))


def test_batch_one_bf16_decodes_without_a_copy_where_onednn_lacks_bf16(monkeypatch):
    monkeypatch.setattr(M, 'ONEDNN_BF16', False)
    fast = tiny('llama', torch.bfloat16)
    with torch.no_grad():
        pack_linears(fast)(X[:1, :1])  # one row: ATen's bf16 matrix-vector product reads the weights as they are
    assert not any('packed' in m.__dict__ for m in linears(fast))


def changes():
    """Ways of changing the weights after a generate; each must be seen by the next generate."""
    def in_place(m):
        with torch.no_grad():
            for lin in linears(m):
                lin.weight.mul_(1.5)

    def load(m):
        m.load_state_dict(tiny().state_dict() | {k: v * -1 for k, v in m.state_dict().items() if 'mlp' in k})

    def train_fused(m):  # fused AdamW writes the weights without bumping their version counters
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        for _ in range(2):
            m(X, X)[1].backward()
            opt.step()
            opt.zero_grad()
        m.eval()

    def step_only(m):  # a fused step with no forward through the model since it last decoded
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()

    def replace_data(m):
        for lin in linears(m):
            lin.weight.data = lin.weight.data * 0.5

    return [in_place, load, train_fused, step_only, replace_data]


@pytest.mark.parametrize('change', changes(), ids=lambda f: f.__name__)
def test_no_stale_packed_weights_after_a_change(change):
    fast = tiny()
    fast.generate(X, 5, temperature=0)
    change(fast)
    ref = stock(fast)
    with torch.no_grad():
        assert torch.allclose(fast(X)[0], ref(X)[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.generate(X, 20, temperature=0), ref.generate(X, 20, temperature=0))


def test_recast_after_generate_packs_again():
    fast = tiny()
    fast.generate(X, 5, temperature=0)
    fast.to(torch.bfloat16)
    ref = stock(fast)
    with torch.no_grad():
        assert torch.allclose(fast(X)[0].float(), ref(X)[0].float(), atol=3e-2, rtol=3e-2)


def test_training_after_generate_gets_the_stock_gradients():
    fast = tiny()
    fast.generate(X, 5, temperature=0)
    ref = stock(fast)
    for m in (fast, ref):
        m.train()
        m(X, X)[1].backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert not any('packed' in m.__dict__ for m in linears(fast))  # a training forward drops the copies


def test_unpack_frees_the_copies_and_generate_leaves_the_model_alone():
    fast = tiny()
    fast.generate(X, 5, temperature=0)
    pack_linears(fast, False)
    assert all(type(m) is torch.nn.Linear and 'packed' not in m.__dict__ for m in linears(fast))
    fast.generate(X, 5, temperature=0)
    assert all(type(m) is torch.nn.Linear for m in linears(fast))


def test_packed_model_copies_and_pickles():
    fast = tiny()
    out = fast.generate(X, 10, temperature=0)
    twin = copy.deepcopy(fast)
    assert not any('packed' in m.__dict__ for m in linears(twin))  # oneDNN's tensors stay behind
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(twin.generate(X, 10, temperature=0), out)
    assert torch.equal(loaded.generate(X, 10, temperature=0), out)


def test_compiled_forward_takes_the_stock_path():  # (sample.py --compile: inductor packs the weights itself)
    fast = tiny()
    ref = stock(fast)
    fast.forward = torch.compile(fast.forward, dynamic=True, backend='eager')
    assert torch.equal(fast.generate(X, 10, temperature=0), ref.generate(X, 10, temperature=0))
    assert not any('packed' in m.__dict__ for m in linears(fast))


@pytest.mark.skipif(M.ONEDNN_BF16, reason="needs a CPU where oneDNN cannot pack bf16 weights")
def test_a_weight_onednn_cannot_pack_falls_back_to_nn_linear(monkeypatch):
    monkeypatch.setattr(M, 'ONEDNN_BF16', True)  # claims bf16 kernels this CPU lacks, so packing raises
    monkeypatch.setattr(M, 'CAN_PACK', True)     # (and restores it after the fallback turned it off)
    fast = tiny('gpt', torch.bfloat16)
    ref = stock(fast)
    assert torch.equal(fast.generate(X, 10, temperature=0), ref.generate(X, 10, temperature=0))
    assert not M.CAN_PACK and all(type(m) is torch.nn.Linear for m in linears(fast))

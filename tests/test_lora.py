import pytest
import torch
import torch.nn as nn

from finetune_lora import (LoRALinear, apply_lora, base_fingerprint, check_base, count_params, load_lora,
                           lora_state_dict, merge_lora)
from model import ModelConfig, build_model
from quantize import NF4_LEVELS, NF4Linear, _blocks, nf4_dequantize, nf4_quantize, pack_4bit, unpack_4bit

PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
CONFIGS = {'gpt': dict(model_type='gpt', n_layer=2, n_head=2, n_embd=32, vocab_size=65, block_size=16),
           'llama': dict(model_type='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=65,
                         block_size=16, tie_embeddings=False)}


def tiny(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**CONFIGS[kind], **kw}))


def tokens(seed=1, B=2, T=12):
    return torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# NF4

def test_nf4_levels_are_the_published_normal_quantiles():
    assert NF4_LEVELS.dtype == torch.float32
    assert torch.equal(NF4_LEVELS, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))
    # where they come from: 8 positive and 7 negative N(0,1) quantiles from offset delta to 1/2, scaled to 1
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((pos, neg, torch.zeros(1, dtype=torch.float64))).sort().values / pos.max()
    assert torch.allclose(levels.float(), NF4_LEVELS, atol=1e-6)


def test_pack_unpack_round_trip():
    assert pack_4bit(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]
    codes = torch.randint(0, 16, (1002,), dtype=torch.uint8)
    assert torch.equal(unpack_4bit(pack_4bit(codes)), codes)


def test_nf4_exact_on_levels_with_odd_count():
    # weights that are levels times a block's absmax come back exactly; 15 elements pad to 4 blocks of 4
    idx = torch.randint(0, 16, (15,))
    idx[::4] = 15  # a 1.0 in every block, so each absmax is exactly 3
    w = (NF4_LEVELS[idx] * 3).view(3, 5)
    q = nf4_quantize(w, block_size=4, double_quant=False)
    assert q['codes'].numel() == 8 and torch.equal(nf4_dequantize(q), w)
    assert nf4_dequantize(q, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match='even'):
        nf4_quantize(w, block_size=5)


def test_nf4_error_bound_and_double_quant_cost():
    torch.manual_seed(0)
    w = torch.randn(300, 257)  # numel not a multiple of 64
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    absmax = _blocks(w, 64).abs().amax(dim=1, keepdim=True)          # (n_blocks, 1)
    err = _blocks(nf4_dequantize(nf4_quantize(w, double_quant=False)) - w, 64).abs()
    assert (err <= half_gap * absmax + 1e-6).all()
    assert 0.06 < err.mean() / w.std() < 0.085  # ~0.073 for normal weights
    q = nf4_quantize(w)
    scale_err = (q['absmax_scale'].max() / 2).item()  # int8 rounding of each block's scale
    err_dq = _blocks(nf4_dequantize(q) - w, 64).abs()
    assert (err_dq <= half_gap * (absmax + scale_err) + scale_err + 1e-6).all()
    assert err_dq.mean() < err.mean() * 1.01  # double quantization adds little


def test_nf4_linear_is_small_and_computes_with_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(256, 384)
    m = NF4Linear.from_linear(lin)
    assert (m.in_features, m.out_features) == (256, 384)
    assert m.weight_bytes() / lin.weight.numel() <= 0.53  # vs 4 bytes in fp32
    assert NF4Linear.from_linear(lin, double_quant=False).weight_bytes() / lin.weight.numel() == 0.5625
    sd = m.state_dict()
    assert max(t.numel() * t.element_size() for t in sd.values()) <= lin.weight.numel() // 2
    x = torch.randn(3, 5, 256)
    assert torch.allclose(m(x), x @ m.dequantized_weight().T + lin.bias, atol=1e-5)
    assert (m(x) - lin(x)).abs().mean() < 0.1 * lin(x).abs().mean()
    assert m(x.bfloat16()).dtype == torch.bfloat16
    other = NF4Linear.from_linear(nn.Linear(256, 384))
    other.load_state_dict(sd)
    assert torch.equal(other(x), m(x))


# ----------------------------------------------------------------------------------------------------------
# LoRA

@pytest.mark.parametrize('kind', ['gpt', 'llama'])
@pytest.mark.parametrize('qlora', [False, True])
def test_trainable_count_is_exact(kind, qlora):
    model = tiny(kind)
    total = sum(p.numel() for p in model.parameters())
    r = 4
    names = apply_lora(model, 'all', r=r, qlora=qlora)
    # per block, (in, out) of each Linear: gpt qkv 32->96, proj 32->32, fc 32->128, proj 128->32;
    # llama (4 heads, 2 kv heads of 8) qkv 32->64, proj 32->32, gate_up 32->256, proj 128->32; not lm_head
    shapes = {'gpt': [(32, 96), (32, 32), (32, 128), (128, 32)],
              'llama': [(32, 64), (32, 32), (32, 256), (128, 32)]}[kind]
    expected = 2 * sum(r * (i + o) for i, o in shapes)
    assert len(names) == 8 and 'lm_head' not in names
    assert count_params(model) == (expected, total + expected)
    assert all(('lora_' in n) == p.requires_grad for n, p in model.named_parameters())
    quantized = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == (8 if qlora else 0)


def test_attn_and_mlp_presets():
    model = tiny('llama')
    assert apply_lora(model, 'attn', r=2) == [f'transformer.h.{i}.attn.{p}' for i in (0, 1) for p in ('qkv', 'proj')]
    model = tiny('gpt')
    assert apply_lora(model, 'mlp', r=2) == [f'transformer.h.{i}.mlp.{p}' for i in (0, 1) for p in ('fc', 'proj')]
    with pytest.raises(ValueError, match='already'):
        apply_lora(model, 'attn')


def test_a_target_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError) as e:
        apply_lora(tiny('gpt'), r'attn\.q_proj$')
    msg = str(e.value)
    assert 'q_proj' in msg and 'transformer.h.0.attn.qkv' in msg and '\n' not in msg


@pytest.mark.parametrize('kind', ['gpt', 'llama'])
def test_zero_init_leaves_outputs_unchanged(kind):
    model, idx = tiny(kind).eval(), tokens()
    before = model(idx)[0]
    apply_lora(model, 'all', dropout=0.1)
    assert torch.equal(model(idx)[0], before)


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model(tokens(seed=10 + step), tokens(seed=20 + step))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize('kind,qlora', [('gpt', False), ('llama', False), ('gpt', True), ('llama', True)])
def test_gradients_reach_only_adapters_and_merge_matches(kind, qlora):
    model = tiny(kind)
    apply_lora(model, 'all', r=4, dropout=0.1, qlora=qlora)
    train_steps(model)
    lora = {n: p for n, p in model.named_parameters() if 'lora_' in n}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)[0]
        assert len(merge_lora(model)) == 8
        merged = model(idx)[0]
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    assert torch.allclose(merged, unmerged, atol=1e-5)
    plain = tiny(kind)
    plain.load_state_dict(model.state_dict())  # a merged model is a plain one again
    assert torch.allclose(plain(idx)[0], merged, atol=1e-6)


def test_bert_classifier_trains_beside_adapters():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type='bert', n_layer=1, n_head=2, n_embd=16, vocab_size=30,
                                    block_size=8, num_labels=3))
    names = apply_lora(model, 'all', r=2, train_extra=('classifier',))
    assert 'pooler' in names and 'mlm_dense' in names and 'classifier' not in names
    assert set(k for k in lora_state_dict(model) if 'lora_' not in k) == {'classifier.weight', 'classifier.bias'}
    # r=2 on qkv 16->48, proj 16->16, fc 16->64, proj 64->16, pooler and mlm_dense 16->16; the whole classifier
    assert count_params(model)[0] == 2 * (64 + 32 + 80 + 80) + 2 * 2 * 32 + (16 * 3 + 3)


def test_adapter_loads_onto_its_base_and_refuses_others():
    model = tiny('llama')
    apply_lora(model, 'attn', r=4)
    train_steps(model, 1)
    state, fingerprint, idx = lora_state_dict(model), base_fingerprint(model), tokens()
    assert all('lora_' in k for k in state)
    same = tiny('llama')
    apply_lora(same, 'attn', r=4)
    load_lora(same, state, fingerprint)
    assert torch.equal(same.eval()(idx)[0], model(idx)[0])
    check_base(tiny('llama').to(torch.bfloat16), fingerprint)  # a bf16 copy of the same base is that base
    quantized = tiny('llama')
    apply_lora(quantized, 'attn', r=4, qlora=True)
    load_lora(quantized, state, fingerprint)  # QLoRA over the same base
    other = tiny('llama', seed=1)
    apply_lora(other, 'attn', r=4)
    with pytest.raises(ValueError, match='different base model: its weights differ'):
        load_lora(other, state, fingerprint)
    with pytest.raises(ValueError, match='config n_layer'):
        check_base(tiny('llama', n_layer=3), fingerprint)
    wrong_rank = tiny('llama')
    apply_lora(wrong_rank, 'attn', r=2)
    with pytest.raises(ValueError, match='shape'):
        load_lora(wrong_rank, state)
    wrong_target = tiny('llama')
    apply_lora(wrong_target, 'mlp', r=4)
    with pytest.raises(ValueError, match='missing'):
        load_lora(wrong_target, state)

import math

import pytest
import torch

from model import BERT, GPT, Decoder, LLaMA, ModelConfig, apply_rope, build_model, configure_optimizers, flops_per_token, num_params, rope_cache


def tiny(model_type, **kw):
    args = dict(model_type=model_type, vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    args.update(kw)
    return ModelConfig(**args)


@pytest.mark.parametrize('model_type,kw', [('gpt', {}), ('llama', {}), ('llama', {'n_kv_head': 2})])
def test_changing_a_future_token_never_changes_earlier_logits(model_type, kw):
    torch.manual_seed(0)
    model = build_model(tiny(model_type, **kw)).eval()
    idx = torch.randint(0, 50, (2, 16))
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.equal(a[:, :t], b[:, :t]), f'position {t} leaked into earlier logits'
        assert not torch.allclose(a[:, t:], b[:, t:]), 'the changed token must affect its own position'


def test_bert_sees_both_sides():
    torch.manual_seed(0)
    model = build_model(tiny('bert')).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 15] = (changed[0, 15] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert not torch.allclose(a[:, 0], b[:, 0]), 'the first position must see the last token'


def test_bert_padding_mask_hides_padded_positions():
    torch.manual_seed(0)
    model = build_model(tiny('bert')).eval()
    idx = torch.randint(0, 50, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 10:] = 0
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 50
    a, _ = model(idx, attention_mask=mask)
    b, _ = model(changed, attention_mask=mask)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)


def test_bert_classification_head_and_tied_mlm_decoder():
    model = build_model(tiny('bert', num_labels=3))
    logits, loss = model.classify(torch.randint(0, 50, (4, 16)), labels=torch.tensor([0, 1, 2, 1]))
    assert logits.shape == (4, 3) and loss.item() > 0
    loss.backward()
    assert model.classifier.weight.grad is not None
    with pytest.raises(ValueError, match='no classification head'):
        build_model(tiny('bert')).classify(torch.zeros(1, 4, dtype=torch.long))


def test_gpt_ties_embeddings_and_llama_can_untie():
    gpt = build_model(tiny('gpt'))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    untied = build_model(tiny('llama', tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert num_params(untied) == num_params(build_model(tiny('llama'))) + 50 * 32


def test_gpt_and_llama_share_the_decoder_and_keep_their_checkpoint_names():
    # checkpoints and the Hugging Face / GGUF name maps depend on these names
    assert issubclass(GPT, Decoder) and issubclass(LLaMA, Decoder) and not issubclass(BERT, Decoder)
    assert all(name not in cls.__dict__ for cls in (GPT, LLaMA) for name in ('forward', 'generate', 'classify'))
    layer = ['ln_1.weight', 'ln_1.bias', 'ln_2.weight', 'ln_2.bias', 'attn.qkv.weight', 'attn.qkv.bias',
             'attn.proj.weight', 'attn.proj.bias', 'mlp.fc.weight', 'mlp.fc.bias', 'mlp.proj.weight', 'mlp.proj.bias']
    assert list(build_model(tiny('gpt', n_layer=1)).state_dict()) == \
        ['transformer.wte.weight', 'transformer.wpe.weight'] + [f'transformer.h.0.{n}' for n in layer] + \
        ['transformer.ln_f.weight', 'transformer.ln_f.bias', 'lm_head.weight']
    layer = ['ln_1.weight', 'ln_2.weight', 'attn.qkv.weight', 'attn.proj.weight', 'mlp.gate_up.weight',
             'mlp.proj.weight']
    assert list(build_model(tiny('llama', n_layer=1, tie_embeddings=False)).state_dict()) == \
        ['transformer.wte.weight'] + [f'transformer.h.0.{n}' for n in layer] + \
        ['transformer.ln_f.weight', 'lm_head.weight']


def test_gpt2_124m_parameter_count_matches_gpt2():
    # GPT-2 small has 124,439,808 parameters with the 50257-token vocabulary (tied head counted once)
    model = GPT(ModelConfig(model_type='gpt', vocab_size=50257, block_size=1024))
    assert num_params(model, non_embedding=False) == 124_439_808


def test_llama_grouped_query_attention_shrinks_kv_projection():
    full = LLaMA(tiny('llama'))
    gqa = LLaMA(tiny('llama', n_kv_head=1))
    assert full.transformer.h[0].attn.qkv.weight.shape == (3 * 32, 32)
    assert gqa.transformer.h[0].attn.qkv.weight.shape == (32 + 2 * 8, 32)
    assert all(m.bias is None for m in gqa.modules() if isinstance(m, torch.nn.Linear))


def test_rope_rotation_preserves_norms_and_depends_only_on_relative_position():
    cos, sin = rope_cache(32, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    assert torch.allclose(apply_rope(q.expand(1, 1, 32, 8), cos, sin).norm(dim=-1), q.norm(), atol=1e-5)

    def score(m, n):  # <rope(q, m), rope(k, n)>
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()
    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-5)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match='model_type'):
        ModelConfig(model_type='t5')
    with pytest.raises(ValueError, match='divisible by n_head'):
        ModelConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match='divisible by n_kv_head'):
        ModelConfig(model_type='llama', n_head=6, n_kv_head=4, n_embd=384)
    with pytest.raises(ValueError, match='longer than block_size'):
        build_model(tiny('gpt'))(torch.zeros(1, 17, dtype=torch.long))


def test_optimizer_decays_matrices_only():
    model = build_model(tiny('gpt'))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay['params']) and decay['weight_decay'] == 0.1
    assert all(p.dim() < 2 for p in no_decay['params']) and no_decay['weight_decay'] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == num_params(model, non_embedding=False)


def test_flops_per_token_counts_every_matmul():
    cfg = tiny('gpt')
    model = build_model(cfg)
    C, L, V, T = 32, 2, 50, 16
    matmul = L * 12 * C * C + V * C  # qkv 3C^2 + proj C^2 + MLP 8C^2 per layer, plus the head
    assert flops_per_token(model, T) == 6 * matmul + 12 * L * C * T


@pytest.mark.parametrize('model_type', ['gpt', 'llama', 'bert'])
def test_bf16_autocast_forward_backward_close_to_fp32(model_type):
    torch.manual_seed(0)
    model = build_model(tiny(model_type))
    idx, tgt = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    _, loss32 = model(idx, tgt)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss16 = model(idx, tgt)
    loss16.backward()
    assert loss16.dtype == torch.float32
    assert math.isclose(loss16.item(), loss32.item(), rel_tol=2e-2)
    assert all(p.grad is not None for name, p in model.named_parameters() if not name.startswith('pooler'))


def test_generate_greedy_is_deterministic_and_crops_context():
    torch.manual_seed(0)
    model = build_model(tiny('llama')).eval()
    idx = torch.randint(0, 50, (2, 20))  # longer than block_size: cropped from the left
    a = model.generate(idx, 5, temperature=0)
    b = model.generate(idx, 5, temperature=0)
    assert a.shape == (2, 25) and torch.equal(a, b)
    assert not hasattr(BERT(tiny('bert')), 'generate')


@pytest.mark.parametrize('causal,masked', [(True, False), (False, True), (False, False)])
def test_cpu_attention_path_equals_the_fused_kernel(causal, masked):
    from model import attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    mask = torch.rand(2, 1, 1, 40) > 0.3 if masked else None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert torch.allclose(attention(q, k, v, causal, mask), want, atol=1e-5)

"""CUDA: what the CPU suite cannot check. bf16 autocast against fp32, causality, the flash kernel through SDPA,
fused AdamW, train.py end to end in bf16 and fp16 with exact resume (and with Muon), torch.compile, the KV cache
and the quantized models, all on the GPU. Every test is skipped without one; `bash .ci/gpu` runs them there."""
import json
import os
import string
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import model as M
import quantize as Q
import train
from model import ModelConfig, build_model, configure_optimizers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 96
DECODERS = [('gpt', {}), ('llama', {'n_kv_head': 2})]  # llama with grouped-query attention


def tiny(model_type, **kw):
    torch.manual_seed(0)
    cfg = dict(model_type=model_type, n_layer=2, n_head=4, n_embd=128, vocab_size=V, block_size=64)
    return build_model(ModelConfig(**{**cfg, **kw})).to('cuda')


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed)).to('cuda')


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- the model on the GPU -------------------------------------------------------------------------------------

@pytest.mark.parametrize('model_type,kw', DECODERS)
def test_bf16_autocast_matches_fp32(model_type, kw):
    model = tiny(model_type, **kw).eval()
    x, y = tokens(4, 64), tokens(4, 64, seed=1)
    with torch.no_grad():
        ref, ref_loss = model(x, y)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out, loss = model(x, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32  # lm_loss takes the loss in fp32
    assert rel_err(out, ref) < 2e-2
    assert abs(loss.item() - ref_loss.item()) < 1e-2


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('model_type,kw', DECODERS)
def test_changing_a_future_token_never_changes_earlier_logits(model_type, kw, dtype):
    # exact, not close: a masked key adds exactly 0 in the fused kernels, and each output row of a matmul is
    # computed from its own input row alone
    model = tiny(model_type, **kw).eval()
    idx = tokens(2, 64)
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        a = model(idx)[0]
        for t in (0, 31, 63):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            b = model(changed)[0]
            assert torch.equal(a[:, :t], b[:, :t]), f'position {t} leaked into earlier logits'
            assert not torch.allclose(a[:, t], b[:, t]), 'the changed token must affect its own position'


@pytest.mark.parametrize('causal', [True, False])
def test_flash_kernel_matches_the_math_backend(causal):
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if flash cannot take these
        out = M.attention(q, k, v, causal)
    with sdpa_kernel(SDPBackend.MATH):
        ref = M.attention(q.float(), k.float(), v.float(), causal)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


SPEEDRUN = ('gpt', {'qk_norm': True, 'mlp': 'relu2', 'logit_softcap': 15.0})  # train.py's speedrun switches


@pytest.mark.parametrize('model_type,kw', DECODERS + [SPEEDRUN])
def test_training_forward_and_backward_run_in_the_flash_kernel(model_type, kw):
    # the model's own q, k, v (views of the fused projection; RoPE'd for llama; through qk_norm's rms_norm) must
    # be ones the flash kernel takes
    model = tiny(model_type, **kw)
    x, y = tokens(4, 64), tokens(4, 64, seed=1)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref = model(x)[0]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            logits, loss = model(x, y)
            loss.backward()
    assert rel_err(logits, ref) < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_adamw_and_train_step_lower_the_loss():
    model = tiny('gpt')
    opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), device_type='cuda')
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['fused'] is True
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    x = tokens(8, 64)
    y = (x + 1) % V  # a rule to learn: the loss falls from ln(96) ~ 4.6 to ~0.2 in 20 steps
    losses = [train.train_step(model, opt, scaler, [(x, y)], 1, 'cuda', 'bfloat16').item() for _ in range(20)]
    assert losses[0] > 4.0 and losses[-1] < 1.0, losses
    assert all(p.is_cuda and torch.isfinite(p).all() for p in model.parameters())


def test_compile_gives_the_losses_of_eager():
    # fp32: bf16 rounding would hide small differences. Inductor fuses and reorders reductions, and AdamW
    # magnifies last-bit gradient differences, so the later steps get a looser tolerance than the first forward
    x = tokens(8, 64)
    y = (x + 1) % V
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    losses = {}
    for name in ('eager', 'compiled'):
        model = tiny('gpt')  # the same initial weights each time (tiny seeds)
        opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cuda')
        step_model = torch.compile(model) if name == 'compiled' else model
        losses[name] = [train.train_step(step_model, opt, scaler, [(x, y)], 1, 'cuda', 'float32').item()
                        for _ in range(3)]
    assert np.isclose(losses['eager'][0], losses['compiled'][0], rtol=1e-5), losses
    assert np.allclose(losses['eager'], losses['compiled'], rtol=1e-3), losses


# --- generation -----------------------------------------------------------------------------------------------

def greedy_without_cache(model, idx, n):
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize('model_type,kw', [('gpt', {}), ('llama', {}), ('llama', {'n_kv_head': 2})])
def test_kv_cache_generation_equals_recomputing_everything(model_type, kw):
    model = tiny(model_type, **kw).eval()
    x = tokens(3, 10)
    y = model.generate(x, 30, temperature=0)
    assert y.is_cuda and torch.equal(y, greedy_without_cache(model, x, 30))
    # left-padded rows of different lengths (boolean masks into SDPA) decode as they do alone
    prompts = [[5, 6, 7], list(range(10, 22)), [3] * 7]
    assert model.generate(prompts, 12, temperature=0) == [model.generate([p], 12, temperature=0)[0] for p in prompts]


def test_sampling_with_a_seed_is_repeatable_on_cuda():
    model = tiny('gpt').eval()
    x = torch.zeros(2, 1, dtype=torch.long, device='cuda')
    a = model.generate(x, 20, temperature=1.0, top_k=20, seed=3)  # a CUDA torch.Generator
    assert torch.equal(a, model.generate(x, 20, temperature=1.0, top_k=20, seed=3))
    assert not torch.equal(a, model.generate(x, 20, temperature=1.0, top_k=20, seed=4))


# --- quantize.py on the GPU -----------------------------------------------------------------------------------

QUANT_MODELS = [('gpt', {}), ('llama', {'n_kv_head': 2, 'tie_embeddings': False})]  # tied and own table


@pytest.mark.parametrize('scheme,tol', [('int8', 0.02), ('int4', 0.25), ('nf4', 0.25)])  # test_quantize.py's bounds
@pytest.mark.parametrize('model_type,kw', QUANT_MODELS)
def test_quantized_models_stay_close_and_reload_on_cuda(tmp_path, model_type, kw, scheme, tol):
    model = tiny(model_type, **kw).eval()
    x = tokens(2, 24)
    with torch.no_grad():
        ref = model(x)[0]
        plan = Q.quantize_model(model, scheme, group_size=32)  # on the GPU, as quantize.py --device=cuda does
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        out = model(x)[0]
        assert out.is_cuda and rel_err(out, ref) < tol
        path = str(tmp_path / 'q.pt')
        Q.save_quantized(model, path, plan)
        again = Q.load_quantized(torch.load(path, weights_only=True)).to('cuda')
        torch.testing.assert_close(again(x)[0], out)
        half = again.to(torch.bfloat16)(x)[0]  # bf16 activations; the scales stay as they were
        assert half.dtype == torch.bfloat16 and rel_err(half, ref) < tol + 0.02
        assert torch.equal(again.generate(x[:1, :8], 8, temperature=0)[:, :8], x[:1, :8])  # decodes with the cache


@pytest.mark.parametrize('scheme', ['int8', 'int4', 'prune'])
def test_quantized_and_pruned_checkpoints_load_on_cuda(tmp_path, scheme):
    # the way sample.py --device=cuda reads quantize.py's output: train.load_model maps the file onto the GPU
    model = tiny('gpt').eval()
    if scheme == 'prune':
        plan = dict(scheme=None, pruned=list(Q.prune(model, 0.5)))  # as quantize.py --mode=prune saves it
    else:
        plan = Q.quantize_model(model, scheme, group_size=32)
    meta = {'vocab_size': V, 'tokenizer': {'kind': 'char', 'chars': list(string.printable[:V])}}
    Q.save_quantized(model, str(tmp_path / 'ckpt.pt'), plan, {'meta': meta})
    loaded, tok = train.load_model(str(tmp_path), device='cuda', dtype='float32')
    x = tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert tok.decode(tok.encode('hi')) == 'hi'


# --- train.py end to end --------------------------------------------------------------------------------------

def tiny_args(data_dir, out_dir, **kw):
    # lr_decay_iters fixed, so that a run stopped at 10 iterations has the schedule of one that goes to 20
    args = dict(data_dir=data_dir, out_dir=out_dir, n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4,
                max_iters=20, eval_interval=5, eval_iters=2, log_interval=1, warmup_iters=5, lr_decay_iters=20,
                learning_rate=3e-3, device='cuda')
    args.update(kw)
    return [f'--{k}={v}' for k, v in args.items()]


def run_train(data_dir, out_dir, **kw):
    # a process of its own, as it is run: train.py sets process-wide CUDA flags (TF32)
    p = subprocess.run([sys.executable, 'train.py', *tiny_args(data_dir, out_dir, **kw)], cwd=REPO,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-3000:]


def records(out_dir, key):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [(r['iter'], r[key]) for r in map(json.loads, f) if key in r]


def check_learns_and_resumes_exactly(data_dir, tmp_path, **kw):
    """20 iterations straight, and 10 then a resume to 20: the same losses bit for bit. Returns the checkpoint."""
    straight, halves = tmp_path / 'straight', tmp_path / 'halves'
    run_train(data_dir, straight, **kw)
    run_train(data_dir, halves, **{**kw, 'max_iters': 10})
    run_train(data_dir, halves, **{**kw, 'init_from': 'resume'})
    losses = records(straight, 'loss')
    assert [i for i, _ in losses] == list(range(1, 21))
    first, last = losses[0][1], np.mean([v for _, v in losses[-5:]])
    assert np.isfinite([v for _, v in losses]).all() and last < first - 0.3, losses  # ~4.17 -> ~3.3
    assert records(halves, 'loss') == losses  # bit for bit
    assert records(halves, 'val_loss') == records(straight, 'val_loss')
    if train.gpu_peak_flops('cuda'):  # a GPU train.py knows by name: every log line has its MFU
        assert len(records(straight, 'mfu')) == 20
    return torch.load(straight / 'ckpt.pt', weights_only=True)


@pytest.mark.parametrize('dtype,kw', [
    ('bfloat16', {'dropout': 0.1, 'gradient_accumulation_steps': 2}),  # dropout's CUDA RNG, micro-steps
    ('float16', {'model_type': 'llama', 'n_kv_head': 1}),               # GradScaler state in the checkpoint
])
def test_train_py_on_cuda_learns_and_resumes_exactly(char_data, tmp_path, dtype, kw):
    ckpt = check_learns_and_resumes_exactly(char_data, tmp_path, dtype=dtype, **kw)
    assert ckpt['config']['device'] == 'cuda' and ckpt['config']['dtype'] == dtype and ckpt['iter_num'] == 20
    assert (ckpt['scaler']['scale'] > 0) if dtype == 'float16' else ckpt['scaler'] == {}  # disabled: no state


def test_muon_bf16_cuda(char_data, tmp_path):
    # --optimizer=muon: Muon for the 2-D hidden weights, AdamW for the rest (embeddings, head, gains, biases)
    ckpt = check_learns_and_resumes_exactly(char_data, tmp_path, optimizer='muon', dtype='bfloat16')
    assert ckpt['config']['optimizer'] == 'muon'

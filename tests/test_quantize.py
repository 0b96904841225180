"""quantize.py: each scheme's rounding error within its bound, packing that round-trips, quantized GPT, LLaMA and
BERT models that run and reload to identical outputs, pruning to the exact sparsity asked, and the command line
that sample.py's checkpoints go through."""
import json
import os

import pytest
import torch
import torch.nn as nn

import quantize as Q
import sample
from model import ModelConfig, build_model
from train import UserError
import train


def tiny(model_type, **kw):
    torch.manual_seed(0)
    args = dict(model_type=model_type, n_layer=2, n_head=4, n_embd=128, vocab_size=96, block_size=64)
    if model_type == 'llama':
        args.update(n_kv_head=2, tie_embeddings=False)  # GQA and its own output head
    return build_model(ModelConfig(**{**args, **kw})).eval()


def test_int8_error_within_half_a_step_per_row():
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3  # rows of different scales
    q, scale = Q.int8_quantize(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)).all()


@pytest.mark.parametrize('group', [32, 64, 128])
def test_int4_error_within_half_a_step_per_group_and_packing_round_trips(group):
    w = torch.randn(48, 256) + torch.linspace(-2, 2, 256)  # groups with offsets: the zero point matters
    codes, scale, zero = Q.int4_quantize(w, group)
    assert codes.max() <= 15 and scale.dtype == zero.dtype == torch.float16 and scale.shape == (48, 256 // group)
    err = (Q.int4_dequantize(codes, scale, zero) - w).abs().view(48, -1, group)
    step = scale.float()[..., None]
    assert (err <= step / 2 + 1e-3 * w.abs().max()).all()  # fp16 scales and zeros add a little
    lin = nn.Linear(256, 48)
    lin.weight.data.copy_(w)
    q = Q.Int4Linear.from_linear(lin, group)
    assert q.codes.shape == (48, 128) and q.codes.dtype == torch.uint8  # two codes per byte
    assert torch.equal(q.unpacked(), codes)
    assert torch.equal(Q.unpack_4bit(Q.pack_4bit(torch.arange(16).repeat(3))), torch.arange(16).repeat(3).byte())
    with pytest.raises(ValueError, match='not a multiple of group_size'):
        Q.int4_quantize(torch.randn(4, 100), 64)


@pytest.mark.parametrize('model_type', ['gpt', 'llama', 'bert'])
@pytest.mark.parametrize('scheme,tol', [('int8', 0.02), ('int4', 0.25), ('nf4', 0.25), ('dynamic', 0.05)])
def test_quantized_models_run_and_reload_identically(tmp_path, model_type, scheme, tol):
    model = tiny(model_type)
    x = torch.randint(0, 96, (2, 24))
    ref = model(x)[0]
    fp32_bytes = Q.file_bytes(model)
    plan = Q.quantize_model(model, scheme, group_size=32)
    assert not any(type(m) is nn.Linear for m in model.modules())  # every Linear was replaced
    out = model(x)[0]
    assert ((out - ref).norm() / ref.norm()) < tol
    path = str(tmp_path / 'q.pt')
    Q.save_quantized(model, path, plan)
    again = Q.load_quantized(torch.load(path, weights_only=True))
    assert torch.equal(again(x)[0], out)
    # real packed tensors on disk: int8 about 1 byte a weight, 4-bit well under one
    assert os.path.getsize(path) < fp32_bytes * {'int8': 0.3, 'int4': 0.2, 'nf4': 0.2, 'dynamic': 0.3}[scheme]


def test_tied_table_is_stored_once_and_stays_shared():
    model = tiny('gpt')
    Q.quantize_model(model, 'int8')
    assert model.transformer.wte.table is model.lm_head
    once = Q.file_bytes(model, {'scheme': 'int8', 'group_size': 64, 'embeddings': True, 'skip': []})
    assert once < Q.weight_bytes(model) * 1.1  # the (V, C) int8 matrix is not written twice
    x = torch.randint(0, 96, (1, 8))
    emb = model.transformer.wte(x)
    torch.testing.assert_close(emb, model.lm_head.dequantized_weight()[x])


class Plain(nn.Module):
    """Not one of model.py's: a token table, a stack of blocks in a ModuleList, a head tied to the table."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(2))
        self.out = nn.Linear(64, 50, bias=False)
        self.out.weight = self.tok.weight

    def forward(self, x):
        h = self.tok(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


@pytest.mark.parametrize('scheme', ['int8', 'int4', 'nf4'])
def test_quantize_and_prune_any_module(scheme):
    # the library part needs no model.config and no transformer names: any nn.Module with Linears
    torch.manual_seed(0)
    m, x = Plain().eval(), torch.randint(0, 50, (2, 7))
    want = m(x)
    plan = Q.quantize_model(m, scheme, group_size=32)
    assert plan["scheme"] == scheme and type(m.tok) is Q.QuantEmbedding and m.tok.table is m.out  # still tied
    assert all(not isinstance(mod, nn.Linear) or isinstance(mod, (Q.Int8Linear, Q.Int4Linear, Q.NF4Linear))
               for mod in m.modules())
    assert (m(x).float() - want).abs().max() < 0.25 * want.abs().max()
    torch.manual_seed(0)
    p = Plain()
    fractions = Q.prune(p, 0.5)
    assert sorted(fractions) == ['blocks.0.0', 'blocks.0.2', 'blocks.1.0', 'blocks.1.2']  # not the table or head
    assert p.out.weight.count_nonzero() == p.out.weight.numel()


def test_quantize_py_copies_alone_with_model_py(tmp_path):
    import shutil
    import subprocess
    import sys
    for f in ('quantize.py', 'model.py'):
        shutil.copy(os.path.join(os.path.dirname(Q.__file__), f), tmp_path)
    code = ("import torch, quantize; m = torch.nn.Sequential(torch.nn.Linear(64, 64)); "
            "quantize.quantize_model(m, 'int8'); print(type(m[0]).__name__)")
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == 'Int8Linear', p.stderr


def test_bfloat16_cast_keeps_scales_exact():
    model = tiny('llama')
    Q.quantize_model(model, 'int4', group_size=32)
    scales = model.lm_head.scales.clone()
    model.to(torch.bfloat16)
    assert model.lm_head.scales.dtype == torch.float16 and torch.equal(model.lm_head.scales, scales)
    logits, _ = model(torch.randint(0, 96, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize('scope', ['global', 'layer'])
def test_pruning_hits_the_sparsity_exactly(scope):
    model = tiny('gpt')
    report = Q.prune(model, 0.3, scope)
    layers = Q.prunable(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    if scope == 'global':
        assert zeros == round(0.3 * sum(m.weight.numel() for _, m in layers))
    else:
        assert all(int((m.weight == 0).sum()) == round(0.3 * m.weight.numel()) for _, m in layers)
        assert all(abs(v - 0.3) < 1e-3 for v in report.values())
    assert model.lm_head.weight.ne(0).all()  # embeddings and head are not pruned


def test_two_four_holds_in_every_group_and_keeps_the_largest():
    model = tiny('llama')
    before = {n: m.weight.detach().clone() for n, m in Q.prunable(model)}
    Q.prune(model, pattern='2:4')
    for name, m in Q.prunable(model):
        groups, orig = m.weight.view(-1, 4), before[name].view(-1, 4)
        assert ((groups != 0).sum(1) == 2).all()
        kept = orig.abs().topk(2, dim=1).indices.sort(1).values
        assert torch.equal((groups != 0).nonzero()[:, 1].view(-1, 2), kept)


def test_pruned_checkpoint_is_smaller_and_reloads_identically(tmp_path):
    model = tiny('gpt')
    names = list(Q.prune(model, 0.75))
    path = str(tmp_path / 'p.pt')
    Q.save_quantized(model, path, {'scheme': None, 'pruned': names})
    again = Q.load_quantized(torch.load(path, weights_only=True))
    x = torch.randint(0, 96, (2, 16))
    assert torch.equal(again(x)[0], model(x)[0])
    assert os.path.getsize(path) < 0.6 * Q.file_bytes(tiny('gpt'))


@pytest.fixture(scope='module')
def char_run(char_data, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp('run'))
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=64',
                '--block_size=64', '--batch_size=8', '--max_iters=40', '--eval_interval=40', '--eval_iters=2',
                '--device=cpu', '--dtype=float32'])
    return out


def test_cli_report_and_checkpoint_that_sample_loads(char_run, char_data, tmp_path):
    out, report = str(tmp_path / 'int8'), str(tmp_path / 'r.json')
    Q.main([f'--init_from={char_run}', '--mode=int8', f'--eval_data={char_data}', '--max_eval_tokens=3000',
            '--decode_tokens=8', f'--out_dir={out}', f'--report={report}'])
    r = json.load(open(report))
    for side in ('original', 'result'):
        assert {'size_bytes', 'val_ppl', 'tokens_per_sec', 'weight_bytes'} <= set(r[side])
    assert r['result']['size_bytes'] < 0.35 * r['original']['size_bytes']
    assert abs(r['result']['val_ppl'] / r['original']['val_ppl'] - 1) < 0.01
    model, tok = train.load_model(out)
    assert isinstance(model.lm_head, Q.Int8Linear)
    # sample.py's evaluation of the saved checkpoint gives the perplexity the report has
    ids = train.eval_data_tokens(Q.QuantizeConfig(eval_data=str(char_data), max_eval_tokens=3000), tok)
    assert abs(train.eval_tokens(model, ids, 0, 8)['ppl'] - r['result']['val_ppl']) < 1e-3
    sample.main([f'--init_from={out}', '--start=ROMEO:', '--max_new_tokens=5', '--num_samples=1', '--seed=1'])


def test_cli_prune_reports_the_layers_that_lose_most(char_run, char_data, tmp_path):
    report = str(tmp_path / 'p.json')
    Q.main([f'--init_from={char_run}', '--mode=prune', '--sparsity=0.5', f'--eval_data={char_data}',
            '--max_eval_tokens=2000', '--sensitivity_tokens=500', '--decode_tokens=0', f'--report={report}'])
    r = json.load(open(report))
    assert set(r['loss_increase_per_layer']) == set(r['sparsity']) and len(r['sparsity']) == 8
    assert r['result']['val_ppl'] > r['original']['val_ppl']


@pytest.mark.parametrize('argv,message', [
    (['--mode=int3'], 'mode must be int8, int4, nf4, dynamic, prune or gguf'),
    (['--mode=int4', '--group_size=48'], 'not a multiple of group_size 48'),
    (['--mode=int8', '--skip=no.such'], '--skip names no Linear'),
    (['--mode=prune', '--sparsity=1.5'], 'prune needs 0 <= sparsity < 1'),
])
def test_cli_errors(char_run, argv, message):
    with pytest.raises(UserError, match=message):
        Q.main([f'--init_from={char_run}', '--decode_tokens=0'] + argv)


def test_quantizing_a_quantized_checkpoint_is_refused(char_run, tmp_path):
    out = str(tmp_path / 'q')
    Q.main([f'--init_from={char_run}', '--mode=int8', '--decode_tokens=0', f'--out_dir={out}'])
    with pytest.raises(UserError, match='already quantized'):
        Q.main([f'--init_from={out}', '--mode=int4', '--decode_tokens=0'])


def test_eval_refuses_a_char_dataset_with_another_vocabulary(char_run, tmp_path):
    import prepare
    other = tmp_path / 'other'
    (tmp_path / 'abc.txt').write_text('abcabcabd ' * 200)
    prepare.main(['--dataset=text', f"--input={tmp_path / 'abc.txt'}", '--tokenizer=char', f'--out_dir={other}'])
    model, tok = train.load_model(char_run)
    with pytest.raises(UserError, match='not this model'):
        train.eval_data_tokens(Q.QuantizeConfig(eval_data=str(other)), tok)

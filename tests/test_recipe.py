"""The modern training recipe (issue 19): Muon, the architecture switches, WSD, document-aligned batches, bits per
byte and the time budget. Each test checks behaviour a run depends on: exact resume, DDP parity, what is saved
and refused, what a batch holds."""
import json
import math
import os
import time

import numpy as np
import pytest
import torch

import model as M
import train
import weights
from conftest import shared_file, torchrun
from test_train import records, tiny_args
from train import TrainConfig, UserError


def tiny(**kw):
    return M.build_model(M.ModelConfig(**{**dict(model_type='llama', n_layer=2, n_head=2, n_embd=32, block_size=16,
                                                 vocab_size=50), **kw}))


# --- Muon ---------------------------------------------------------------------------------------------------

def test_newton_schulz_orthogonalises_any_shape():
    for shape in [(64, 64), (96, 32), (32, 96)]:
        G = torch.randn(*shape) + torch.randn(shape[0], 1) @ torch.randn(1, shape[1])  # one direction dominates
        s = torch.linalg.svdvals(M.newton_schulz(G, dtype=torch.float32))
        # every direction moves about equally, the dominant one too (a square matrix's few near-zero singular
        # values stay small: 5 steps do not lift those)
        assert s.max() < 1.25 and (s > 0.6).float().mean() > 0.9 and (shape[0] == shape[1] or s.min() > 0.6), shape
        assert M.newton_schulz(G, dtype=torch.bfloat16).dtype == G.dtype


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny(tie_embeddings=False, n_kv_head=1)
    opt = M.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', muon=dict(lr=0.02))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)]: g['split'] for g in opt.param_groups if g['muon'] for p in g['params']}
    adamw = {names[id(p)] for g in opt.param_groups if not g['muon'] for p in g['params']}
    assert set(muon) == {n for n, p in model.named_parameters() if p.dim() == 2 and '.h.' in n}
    assert {'transformer.wte.weight', 'lm_head.weight', 'transformer.ln_f.weight'} <= adamw
    assert muon['transformer.h.0.attn.qkv.weight'] == [32, 16, 16]  # q, k, v orthogonalised apart (1 kv head)
    assert muon['transformer.h.0.mlp.gate_up.weight'] == [128, 128] and muon['transformer.h.0.attn.proj.weight'] is None
    assert all(g['lr_ratio'] == 20 for g in opt.param_groups if g['muon'])


def test_muon_update_has_the_spectral_scale_whatever_the_gradient():
    model = tiny()
    opt = M.configure_optimizers(model, 0.0, 1e-3, (0.9, 0.95), 'cpu', muon=dict(lr=0.1, momentum=0.0))
    W = model.transformer.h[0].attn.proj.weight
    before = W.detach().clone()
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-6  # a tiny gradient still moves the matrix by ~lr in spectral norm
    opt.step()
    step = torch.linalg.svdvals(W.detach() - before)
    # (a square random gradient has a few near-zero singular values, which 5 Newton-Schulz steps leave small)
    assert 0.06 < step.max() < 0.125 and (step > 0.05).float().mean() > 0.9


@pytest.mark.parametrize('dtype,kw', [('float32', {'gradient_accumulation_steps': 2, 'dropout': 0.1}),
                                      ('bfloat16', {'lr_schedule': 'wsd'})])
def test_muon_learns_and_resumes_bit_for_bit(char_data, tmp_path, dtype, kw):
    common = dict(model_type='llama', optimizer='muon', dtype=dtype, lr_decay_iters=20, **kw)
    straight, halves = tmp_path / 'straight', tmp_path / 'halves'
    train.main(tiny_args(char_data, straight, max_iters=20, **common))
    train.main(tiny_args(char_data, halves, max_iters=10, **common))
    train.main(tiny_args(char_data, halves, max_iters=20, init_from='resume', **common))
    losses = records(straight, 'loss')
    assert losses[-1][1] < losses[0][1] - 0.5
    assert losses == records(halves, 'loss') and records(straight, 'val_loss') == records(halves, 'val_loss')
    ckpt = torch.load(halves / 'ckpt.pt', weights_only=True)
    assert any('momentum_buffer' in s for s in ckpt['optimizer']['state'].values())


def test_muon_under_torchrun_follows_the_single_process_curve(char_data, tmp_path):
    # each process orthogonalises half of the matrices and broadcasts them: the same steps as one process
    args = tiny_args(char_data, tmp_path / 'one', max_iters=6, gradient_accumulation_steps=2, eval_interval=3,
                     optimizer='muon', n_layer=3)
    train.main(args)
    ddp_args = [a.replace(str(tmp_path / 'one'), str(tmp_path / 'two')) for a in args]
    torchrun('train.py', ddp_args)
    one, two = records(tmp_path / 'one', 'loss'), records(tmp_path / 'two', 'loss')
    assert [i for i, _ in one] == [i for i, _ in two] == list(range(1, 7))
    assert np.allclose([v for _, v in one], [v for _, v in two], rtol=1e-5)
    assert np.allclose([v for _, v in records(tmp_path / 'one', 'val_loss')],
                       [v for _, v in records(tmp_path / 'two', 'val_loss')], rtol=1e-5)


def test_muon_refuses_fsdp_and_a_checkpoint_of_another_optimizer(char_data, tmp_path):
    with pytest.raises(UserError, match='optimizer=muon needs whole matrices and fsdp=True shards them'):
        train.main(tiny_args(char_data, tmp_path, optimizer='muon', fsdp=True))
    train.main(tiny_args(char_data, tmp_path, max_iters=5))
    with pytest.raises(UserError, match='trained with optimizer=adamw.*resume with --optimizer=adamw'):
        train.main(tiny_args(char_data, tmp_path, max_iters=8, optimizer='muon', init_from='resume'))
    for bad, message in [({'optimizer': 'sgd'}, 'optimizer must be adamw or muon'),
                         ({'lr_schedule': 'linear'}, 'lr_schedule must be cosine or wsd'),
                         ({'decay_frac': 0.0}, r'decay_frac must be in \(0, 1\]'),
                         ({'mlp': 'tanh'}, 'mlp must be gelu, swiglu or relu2')]:
        with pytest.raises(UserError, match=message):
            train.main(tiny_args(char_data, tmp_path / 'bad', **bad))


# --- architecture switches ----------------------------------------------------------------------------------

SWITCHES = [dict(qk_norm=True), dict(mlp='relu2'), dict(logit_softcap=5.0), dict(zero_init=True),
            dict(tie_embeddings=False), dict(model_type='gpt', mlp='relu2', qk_norm=True, tie_embeddings=False)]


@pytest.mark.parametrize('kw', SWITCHES)
def test_switches_keep_decoders_causal_and_are_saved_in_checkpoints(char_data, tmp_path, kw):
    train.main(tiny_args(char_data, tmp_path, max_iters=3, eval_interval=3, **{'model_type': 'llama', **kw}))
    model, _ = train.load_model(str(tmp_path))
    for k, v in kw.items():
        assert getattr(model.config, k) == v
    x = torch.randint(0, 65, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 65, (2, 6))
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6) and not torch.allclose(a[:, 10:], b[:, 10:])
    # a KV-cached greedy decode agrees with recomputing the whole sequence each step
    out = model.generate(x[:1, :4], 6, temperature=0)
    full = x[:1, :4]
    for _ in range(6):
        full = torch.cat([full, model(full)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, full)


def test_switch_semantics():
    capped = tiny(logit_softcap=2.0)
    with torch.no_grad():
        for p in capped.parameters():
            p.mul_(50)
    assert capped(torch.randint(0, 50, (1, 8)))[0].abs().max() <= 2.0
    zero = tiny(zero_init=True, tie_embeddings=False)
    projections = [b.attn.proj.weight for b in zero.transformer.h] + [b.mlp.proj.weight for b in zero.transformer.h]
    assert all(not w.any() for w in projections) and not zero.lm_head.weight.any()
    assert zero.transformer.h[0].attn.qkv.weight.std() > 0.01  # the rest keeps GPT-2's init
    gpt = M.build_model(M.ModelConfig(model_type='gpt', n_layer=1, n_head=2, n_embd=32, block_size=16,
                                      vocab_size=50, tie_embeddings=False, mlp='relu2'))
    assert gpt.lm_head.weight is not gpt.transformer.wte.weight and isinstance(gpt.transformer.h[0].mlp, M.MLP)
    assert gpt.config.intermediate_size == 128 and tiny(mlp='relu2').config.intermediate_size == 128
    assert M.ModelConfig(model_type='llama').mlp == 'swiglu' and M.ModelConfig().mlp == 'gelu'
    # the family's MLP by default: a checkpoint written before the switches existed loads as it was
    assert M.ModelConfig(**{k: v for k, v in vars(M.ModelConfig(model_type='llama')).items() if k != 'mlp'}).mlp == \
        'swiglu'


@pytest.mark.parametrize('kw,why', [(dict(qk_norm=True), 'qk_norm'), (dict(mlp='relu2'), 'mlp=relu2'),
                                    (dict(logit_softcap=15.0), 'logit_softcap=15'),
                                    (dict(model_type='gpt', tie_embeddings=False), 'an untied head')])
def test_export_refuses_what_the_format_cannot_represent(tmp_path, kw, why):
    model = tiny(**kw)
    with pytest.raises(weights.PretrainedError, match=f"has {why}.*Hugging Face's .* format cannot represent"):
        weights.save_pretrained(model, tmp_path / 'hf')
    with pytest.raises(weights.GGUFError, match=f"has {why}.*GGUF's .* format cannot represent"):
        weights.save_gguf(model, tmp_path / 'm.gguf', None)
    assert not os.path.exists(tmp_path / 'hf') and not os.path.exists(tmp_path / 'm.gguf')


def test_zero_init_and_an_untied_llama_head_still_export(tmp_path):
    model = tiny(zero_init=True, tie_embeddings=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # as after training: the zeros were only the start
    weights.save_pretrained(model, tmp_path / 'hf')
    back = weights.from_pretrained(str(tmp_path / 'hf'))
    x = torch.randint(0, 50, (1, 8))
    assert torch.allclose(model.eval()(x)[0], back(x)[0], atol=1e-5)


# --- schedules --------------------------------------------------------------------------------------------------

def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1, lr_schedule='wsd', decay_frac=0.2)
    lrs = [train.get_lr(i, cfg) for i in range(101)]
    assert lrs[0] < lrs[9] < 1.0 and all(lr == 1.0 for lr in lrs[10:81])
    assert np.allclose(np.diff(lrs[80:101]), -0.9 / 20) and lrs[100] == 0.1


# --- document-aligned batches -------------------------------------------------------------------------------

def test_rows_start_at_documents_and_are_best_fit_packed():
    eot = 99
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, n) for n in rng.integers(3, 40, 300)]
    stream = np.concatenate([np.concatenate(([eot], d)) if i else d for i, d in enumerate(docs)])
    shards = [stream[:4000], stream[4000:]]
    index = train.document_index(shards, eot)
    assert index[0, 1] == 0 and all(shards[s][o] == eot for s, o, _ in index[1:])
    # the documents tile the shards, but for the second shard's head: the end of a document cut by the shard
    assert index[:, 2].sum() == len(stream) - np.flatnonzero(shards[1] == eot)[0]
    cfg = TrainConfig(batch_size=32, block_size=63, seed=3)
    x, y = train.get_batch({'train': shards}, cfg, 'train', 7, 1, 'cpu', docs={'train': index})
    x2, _ = train.get_batch({'train': shards}, cfg, 'train', 7, 1, 'cpu', docs={'train': index})
    assert torch.equal(x, x2) and x.shape == (32, 63) and torch.equal(x[:, 1:], y[:, :-1])
    # every row is whole documents, each from its start, and at most one cut: the last (best fit fills the rest)
    documents = [shards[s][o:o + n] for s, o, n in index]
    for row in train.pack_documents(shards, index, np.random.default_rng(1), 100, 64):
        pos = 0
        while pos < len(row):
            room = len(row) - pos
            doc = next(d for d in documents if np.array_equal(row[pos:pos + min(len(d), room)], d[:room]))
            assert len(doc) <= room or pos + room == len(row)
            pos += len(doc)


def test_doc_aligned_training_on_gpt2_tokens_reports_bits_per_byte(tmp_path, monkeypatch):
    import prepare
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))
    text = open(shared_file('tinyshakespeare.txt'), encoding='utf-8').read()[:200_000]
    docs = [json.dumps({'text': d}) for d in text.split('\n\n') if d.strip()]
    (tmp_path / 'docs.jsonl').write_text('\n'.join(docs) + '\n')
    prepare.main(['--dataset=text', f"--input={tmp_path / 'docs.jsonl'}", '--tokenizer=gpt2',
                  f"--out_dir={tmp_path / 'data'}"])
    meta, data = train.load_data(str(tmp_path / 'data'))
    sizes = train.token_bytes(meta, 50304)
    ids = torch.tensor(data['val'][0][:5000].astype(np.int64))
    real = ids[ids != 50256]
    assert sizes[real].sum().item() == len(train.meta_tokenizer(meta).decode(real.tolist()).encode('utf-8'))
    assert sizes[50256] == 0 and sizes[50257:].sum() == 0
    train.main(tiny_args(tmp_path / 'data', tmp_path / 'out', doc_aligned=True, max_iters=4, eval_interval=4,
                         vocab_size=50304))
    last = records(tmp_path / 'out', 'val_bpb')[-1][1]
    loss = records(tmp_path / 'out', 'val_loss')[-1][1]
    # ~4 bytes per GPT-2 token of English: bpb is a quarter of the loss in bits, give or take
    assert 0.15 < last / (loss / math.log(2)) < 0.4


def test_doc_aligned_needs_documents(char_data, tmp_path):
    with pytest.raises(UserError, match='doc_aligned=True needs documents separated by an end-of-text token'):
        train.main(tiny_args(char_data, tmp_path, doc_aligned=True))


def test_bits_per_byte_of_ascii_characters_is_the_loss_in_bits(char_data, tmp_path):
    train.main(tiny_args(char_data, tmp_path, max_iters=5, eval_interval=5))
    (_, loss), (_, bpb) = records(tmp_path, 'val_loss')[-1], records(tmp_path, 'val_bpb')[-1]
    assert bpb == pytest.approx(loss / math.log(2), rel=1e-5)


# --- the time budget ------------------------------------------------------------------------------------------

@pytest.fixture
def steady_clock(monkeypatch):
    """max_minutes sees 5 ms per iteration and a budget that starts when it decides, however loaded the machine is
    (the arithmetic is what is tested here, not this machine's speed)."""
    real = train.choose_max_iters
    monkeypatch.setattr(train, 'choose_max_iters', lambda cfg, proc, progress, times, started, cap:
                        real(cfg, proc, progress, [0.005] * len(times), time.time(), cap))


def test_max_minutes_fixes_max_iters_and_the_run_equals_one_of_that_length(char_data, tmp_path, steady_clock):
    train.main(tiny_args(char_data, tmp_path / 'budget', max_minutes=0.02, max_iters=0, eval_interval=10,
                         log_interval=5))
    chosen = [r for r in map(json.loads, open(tmp_path / 'budget' / 'metrics.jsonl')) if 'max_iters' in r]
    assert len(chosen) == 1 and chosen[0]["iter"] == 6  # timed over warmup_iters + 1 iterations
    n = chosen[0]['max_iters']
    # 1.176 s at 5 ms per iteration and 3.3 ms per evaluation every 10 iterations: 6 + 1.176 / 0.00533 ~ 226
    assert 215 < n < 230 and records(tmp_path / 'budget', 'val_loss')[-1][0] == n
    assert json.load(open(tmp_path / 'budget' / 'config.json'))['max_iters'] == n
    # a schedule like any other: a plain run of n iterations gives the same losses, bit for bit
    train.main(tiny_args(char_data, tmp_path / 'plain', max_iters=n, eval_interval=10, log_interval=5))
    assert records(tmp_path / 'plain', 'loss') == records(tmp_path / 'budget', 'loss')
    assert records(tmp_path / 'plain', 'val_loss') == records(tmp_path / 'budget', 'val_loss')


def test_max_minutes_resume_keeps_the_chosen_length_and_is_exact(char_data, tmp_path, monkeypatch, capsys,
                                                                 steady_clock):
    real_save = train.save_checkpoint

    def save(obj, path):  # keep the checkpoint of iteration 10, as if the run had been stopped there
        real_save(obj, path)
        if obj['iter_num'] == 10:
            real_save(obj, str(tmp_path / 'at10.pt'))
    monkeypatch.setattr(train, 'save_checkpoint', save)
    args = tiny_args(char_data, tmp_path / 'straight', max_minutes=0.01, max_iters=0, eval_interval=10)
    train.main(args)
    n = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)['budget_iters']
    assert n > 20
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    (resumed / 'ckpt.pt').write_bytes((tmp_path / 'at10.pt').read_bytes())
    (resumed / 'metrics.jsonl').write_text((tmp_path / 'straight' / 'metrics.jsonl').read_text())
    capsys.readouterr()
    train.main([a.replace(str(tmp_path / 'straight'), str(resumed)) for a in args] + ['--init_from=resume'])
    out = capsys.readouterr().out
    assert f'note: max_iters={n}, as max_minutes chose it' in out and 'ms per iteration' not in out  # not re-timed
    assert records(resumed, 'loss') == records(tmp_path / 'straight', 'loss')
    assert records(resumed, 'val_loss') == records(tmp_path / 'straight', 'val_loss')


def test_max_iters_caps_what_max_minutes_chooses(char_data, tmp_path, steady_clock):
    # a GPU would fit thousands of quick-start iterations in its ten minutes: the config's max_iters stays the most
    train.main(tiny_args(char_data, tmp_path, max_minutes=10.0, max_iters=30, eval_interval=10))
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['budget_iters'] == 30
    assert records(tmp_path, 'val_loss')[-1][0] == 30

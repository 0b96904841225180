import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import train
from conftest import torchrun
from train import TrainConfig, UserError, get_batch, get_lr, mask_tokens, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data_dir, out_dir, **kw):
    args = dict(data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=64, block_size=32,
                batch_size=4, max_iters=20, eval_interval=5, eval_iters=2, log_interval=1, warmup_iters=5,
                learning_rate=3e-3, dtype='float32', device='cpu')
    args.update(kw)
    return [f'--{k}={v}' for k, v in args.items()]


def records(out_dir, key):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [(r['iter'], r[key]) for r in map(json.loads, f) if key in r]


# --- configuration ------------------------------------------------------------------------------------------

def test_overrides_apply_in_order_and_are_typed(tmp_path):
    conf = tmp_path / 'c.py'
    conf.write_text("import math\nn_layer = 3\nlearning_rate = 2e-3\n_private = 'ignored'\nmax_iters = 10 * 10\n")
    cfg = parse_config(TrainConfig, [str(conf), '--n_layer=4', '--learning_rate=1', '--compile=true',
                                     '--out_dir=123', '--dtype=float32'])
    assert (cfg.n_layer, cfg.max_iters, cfg.compile, cfg.out_dir, cfg.dtype) == (4, 100, True, '123', 'float32')
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize('argv,message', [
    (['--lr=1e-3'], "unknown config key 'lr'"),
    (['--learning_rat=1e-3'], 'did you mean learning_rate'),
    (['--max_iters=1.5'], "'max_iters' (command line) must be int"),
    (['--max_iters=True'], "must be int"),
    (['--compile=maybe'], "must be bool"),
    (['--n_layer'], 'must look like --n_layer=VALUE'),
    (['nonexistent_config.py'], "config file 'nonexistent_config.py' not found"),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(UserError, match=None) as e:
        parse_config(TrainConfig, argv)
    assert message in str(e.value)


def test_typo_in_config_file_is_caught(tmp_path):
    conf = tmp_path / 'c.py'
    conf.write_text("batchsize = 8\n")
    with pytest.raises(UserError, match=r"unknown config key 'batchsize' \(.*c.py\); did you mean batch_size"):
        parse_config(TrainConfig, [str(conf)])


def test_cli_prints_one_line_error_and_exits_2():
    p = subprocess.run([sys.executable, 'train.py', '--n_layers=2'], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: unknown config key 'n_layers' (command line); did you mean n_layer?"


# --- data and schedule ---------------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_iteration_and_micro_step():
    data = {'train': [np.arange(1000, dtype=np.uint16)]}
    cfg = TrainConfig(batch_size=4, block_size=8)
    x1, y1 = get_batch(data, cfg, 'train', 7, 1, 'cpu')
    x2, y2 = get_batch(data, cfg, 'train', 7, 1, 'cpu')
    x3, _ = get_batch(data, cfg, 'train', 7, 2, 'cpu')
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1, x1 + 1)  # targets are the inputs shifted by one


def test_mlm_masking_80_10_10():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (64, 256))
    inputs, targets = mask_tokens(x, rng, mask_id=60, vocab_size=60, mlm_probability=0.15)
    picked = targets != -100
    assert abs(picked.mean() - 0.15) < 0.01
    assert np.array_equal(targets[picked], x[picked])
    assert np.array_equal(inputs[~picked], x[~picked])  # unpicked positions are untouched
    masked = (inputs == 60) & picked
    assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
    kept = (inputs == x) & picked
    assert abs(kept.sum() / picked.sum() - 0.1 - 0.1 / 60) < 0.02


def test_lr_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert abs(lrs[10] - 1.0) < 1e-9 and abs(lrs[60] - 0.55) < 1e-9 and lrs[110] == 0.1 == lrs[119]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# --- training -------------------------------------------------------------------------------------------------

def test_loss_falls_on_real_text(char_data, tmp_path):
    train.main(tiny_args(char_data, tmp_path, max_iters=200, eval_interval=200, eval_iters=4, batch_size=8,
                          learning_rate=3e-3, dtype='bfloat16'))
    losses = records(tmp_path, 'loss')
    assert losses[0][1] > 3.8  # about ln(65) at the start
    assert records(tmp_path, 'val_loss')[-1][1] < 2.7
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['max_iters'] == 200
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 200 and ckpt['meta']['vocab_size'] == 65


@pytest.mark.parametrize('model_type,dtype,kw', [
    ('gpt', 'float32', {'dropout': 0.1, 'gradient_accumulation_steps': 2}),
    ('llama', 'bfloat16', {}),
    ('bert', 'bfloat16', {'dropout': 0.1}),
])
def test_resume_is_exact(char_data, tmp_path, model_type, dtype, kw):
    common = dict(model_type=model_type, dtype=dtype, lr_decay_iters=20, **kw)
    straight, halves = tmp_path / 'straight', tmp_path / 'halves'
    train.main(tiny_args(char_data, straight, max_iters=20, **common))
    train.main(tiny_args(char_data, halves, max_iters=10, **common))
    train.main(tiny_args(char_data, halves, max_iters=20, init_from='resume', **common))
    assert len(records(straight, 'loss')) == 20
    assert records(straight, 'loss') == records(halves, 'loss')  # bit for bit
    assert records(straight, 'val_loss') == records(halves, 'val_loss')


def test_resume_drops_log_records_written_after_the_checkpoint(char_data, tmp_path):
    train.main(tiny_args(char_data, tmp_path, max_iters=10))
    with open(tmp_path / 'metrics.jsonl', 'a') as f:  # as if the run crashed after logging iteration 11
        f.write(json.dumps({'iter': 11, 'loss': 99.0}) + '\n')
    train.main(tiny_args(char_data, tmp_path, max_iters=12, init_from='resume'))
    assert [i for i, _ in records(tmp_path, 'loss')] == list(range(1, 13))


def test_early_stopping_on_patience(char_data, tmp_path):
    # with no learning at all the validation loss never improves after the first evaluation
    train.main(tiny_args(char_data, tmp_path, max_iters=40, learning_rate=0.0, min_lr=0.0, patience=2))
    assert [i for i, _ in records(tmp_path, 'val_loss')] == [5, 10, 15]


def test_data_errors_are_actionable(char_data, tmp_path):
    with pytest.raises(UserError, match=r'run `python prepare.py --dataset=shakespeare_char'):
        train.main(tiny_args(tmp_path / 'shakespeare_char', tmp_path / 'o'))
    with pytest.raises(UserError, match=r"vocabulary \(65 tokens\) is larger than the model's vocab_size=50"):
        train.main(tiny_args(char_data, tmp_path / 'o', vocab_size=50))
    with pytest.raises(UserError, match=r'not more than block_size=2000000'):
        train.main(tiny_args(char_data, tmp_path / 'o', block_size=2_000_000))
    with pytest.raises(UserError, match=r'must be divisible by n_head'):
        train.main(tiny_args(char_data, tmp_path / 'o', n_embd=66, n_head=4))
    with pytest.raises(UserError, match=r"no checkpoint at"):
        train.main(tiny_args(char_data, tmp_path / 'empty', init_from='resume'))


def test_dry_run_of_the_75m_config_without_data(capsys):
    train.main([os.path.join(REPO, 'config', 'gpt75m_dolma.py'), '--dry_run=True', '--batch_size=1',
                '--block_size=64', '--data_dir=/nonexistent', '--device=cpu'])
    out = capsys.readouterr().out
    assert 'gpt: 69.7' in out and 'M parameters' in out  # 10 layers x 640 wide, 32k vocab, tied head
    assert 'estimated memory' in out and 'dry run: one iteration' in out


def test_out_of_memory_suggests_gradient_accumulation(char_data, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")
    monkeypatch.setattr(train, 'train_step', oom)
    with pytest.raises(UserError, match=r'does not fit in memory; try --batch_size=2 --gradient_accumulation_steps=2'):
        train.main(tiny_args(char_data, tmp_path))


def test_float16_uses_a_grad_scaler_and_learns(char_data, tmp_path):
    train.main(tiny_args(char_data, tmp_path, dtype='float16', max_iters=10, eval_interval=10))
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['scaler']['scale'] > 0 and ckpt['config']['dtype'] == 'float16'
    losses = [v for _, v in records(tmp_path, 'loss')]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_torchrun_two_processes_follow_the_single_process_curve(char_data, tmp_path, mode):
    # gradient_accumulation_steps is global: 2 processes run one micro-step each, on the same batches that
    # one process runs as two micro-steps, and the logged loss is the mean over both
    args = tiny_args(char_data, tmp_path / 'one', max_iters=6, gradient_accumulation_steps=2, eval_interval=3)
    train.main(args)
    ddp_args = [a.replace(str(tmp_path / 'one'), str(tmp_path / 'two')) for a in args] + [f'--fsdp={mode == "fsdp"}']
    torchrun('train.py', ddp_args)
    one, two = records(tmp_path / 'one', 'loss'), records(tmp_path / 'two', 'loss')
    assert [i for i, _ in one] == [i for i, _ in two] == list(range(1, 7))
    assert np.allclose([v for _, v in one], [v for _, v in two], rtol=1e-5)
    # a checkpoint written under DDP or FSDP resumes in a single process
    train.main(ddp_args + ['--max_iters=8', '--init_from=resume', '--fsdp=False'])
    assert [i for i, _ in records(tmp_path / 'two', 'loss')] == list(range(1, 9))


def test_fsdp_needs_torchrun(char_data, tmp_path):
    with pytest.raises(UserError, match='run under `torchrun --nproc_per_node=N'):
        train.main(tiny_args(char_data, tmp_path, fsdp=True))


@pytest.mark.parametrize('model_type', ['gpt', 'llama', 'bert'])
def test_grad_checkpoint_gives_the_same_losses(char_data, tmp_path, model_type):
    kw = dict(model_type=model_type, max_iters=4, eval_interval=4, dropout=0.1)
    train.main(tiny_args(char_data, tmp_path / 'plain', **kw))
    train.main(tiny_args(char_data, tmp_path / 'ckpt', grad_checkpoint=True, **kw))
    plain, ckpt = records(tmp_path / 'plain', 'loss'), records(tmp_path / 'ckpt', 'loss')
    assert np.allclose([v for _, v in plain], [v for _, v in ckpt], rtol=1e-6)


def test_compile_gives_the_same_losses(char_data, tmp_path):
    train.main(tiny_args(char_data, tmp_path / 'plain', max_iters=3, eval_interval=3))
    train.main(tiny_args(char_data, tmp_path / 'compiled', max_iters=3, eval_interval=3, compile=True))
    plain, compiled = records(tmp_path / 'plain', 'loss'), records(tmp_path / 'compiled', 'loss')
    assert np.allclose([v for _, v in plain], [v for _, v in compiled], rtol=1e-4)


def test_sharded_data_is_read_as_one_stream():
    shards = [np.arange(0, 100), np.arange(1000, 1040), np.arange(5000, 5005)]  # the last is too short
    w = train.sample_windows(shards, np.random.default_rng(0), 4000, 10)
    assert (np.diff(w, axis=1) == 1).all()  # no window crosses a shard boundary
    first = w[:, 0]
    assert not ((first >= 5000).any()) and first.max() <= 1030 and first.min() == 0
    # start positions are uniform over the 90 + 30 valid ones, so shard 1 gets a quarter of the windows
    assert abs((first >= 1000).mean() - 30 / 120) < 0.03


def test_a_task_of_ones_own_trains_saves_and_resumes_exactly(tmp_path):
    # the extension point finetune_lora.py uses: a Task, a state file of its own, resume as an argument
    saved = []

    def make_task(cfg, ckpt, device, master):
        torch.manual_seed(0)
        model = train.build_model(train.ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11,
                                                    dropout=0.1))

        def batch(split, it, micro):
            x = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(it * 100 + micro + (split == 'val')))
            return x[:, :-1], x[:, 1:].contiguous()
        return train.Task(model=model, model_args=asdict(model.config), meta={'vocab_size': 11}, batch=batch,
                          on_save=saved.append)

    def run(out, max_iters, resume=False):
        cfg = train.LoopConfig(out_dir=str(out), block_size=8, batch_size=2, max_iters=max_iters, eval_interval=2,
                               eval_iters=1, log_interval=1, warmup_iters=2, lr_decay_iters=6, device='cpu',
                               dtype='float32')
        return train.train(cfg, make_task, resume=resume, state_file='state.pt')
    run(tmp_path / 'straight', 6)
    assert len(saved) == 3 and all(isinstance(m, torch.nn.Module) for m in saved)
    assert os.path.exists(tmp_path / 'straight' / 'state.pt') and not os.path.exists(tmp_path / 'straight' / 'ckpt.pt')
    run(tmp_path / 'halves', 4)
    run(tmp_path / 'halves', 6, resume=True)
    assert records(tmp_path / 'straight', 'loss') == records(tmp_path / 'halves', 'loss')

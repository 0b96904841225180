"""Careless input on the command line: every script answers with one line on stderr and a non-zero exit, never
a traceback, and never runs silently with rc 0 having done nothing."""
import json
import os
import subprocess
import sys

import pytest

import chat_ui
import finetune_lora
import prepare
import quantize
import rag
import eval as E
import sample
import train

from conftest import shared_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(module, args, capsys, monkeypatch):
    """Run module's CLI as `python module.py args` does (train.run_cli: UserError -> one line, exit 2), in
    process; any other exception fails the test with its traceback."""
    monkeypatch.setattr(sys, 'argv', [module.__name__ + '.py', *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.run_cli(module.main)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    a_dir = tmp_path / 'a_dir'
    a_dir.mkdir()
    return str(a_file), str(a_dir)


def test_output_folders_that_are_files_and_files_that_are_folders(paths, char_data, capsys, monkeypatch):
    a_file, a_dir = paths
    cases = [
        (prepare, ['--dataset=shakespeare_char', f"--input={shared_file('tinyshakespeare.txt')}", f'--out_dir={a_file}'],
         'is a file'),
        (prepare, ['--dataset=shakespeare_char', f'--out_dir={a_file}/sub'], 'which is a file'),
        (train, [f'--data_dir={char_data}', f'--out_dir={a_file}'], 'is a file'),
        (quantize, ['--init_from=gpt2', f'--out_dir={a_file}'], 'is a file'),
        (quantize, ['--init_from=gpt2', '--mode=gguf', f'--out={a_dir}'], 'is a folder'),
        (quantize, ['--init_from=gpt2', f'--report={a_dir}'], 'is a folder'),
        (rag, ['index', '--docs=.', f'--index={a_file}'], 'is a file'),
        (rag, ['eval', f'--report={a_dir}'], 'is a folder'),
        (rag, ['tune', f'--out_dir={a_file}/x/y'], 'which is a file'),
        (sample, ['--init_from=gpt2', f'--output={a_dir}'], 'is a folder'),
        (E, ['--init_from=gpt2', f'--report={a_file}/r.md'], 'which is a file'),
        (finetune_lora, ['--data=x.json', f'--out_dir={a_file}'], 'is a file'),
    ]
    for module, args, message in cases:
        assert message in cli(module, args, capsys, monkeypatch), (module.__name__, args)
    assert open(a_file).read() == 'x'  # nothing was written over


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=0', 'batch_size must be > 0'),
    ('--eval_interval=0', 'eval_interval must be > 0'),
    ('--eval_iters=0', 'eval_iters must be > 0'),
    ('--log_interval=-1', 'log_interval must be > 0'),
    ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps must be > 0'),
    ('--block_size=0', 'block_size must be > 0'),
    ('--n_layer=0', 'n_layer must be > 0'),
    ('--learning_rate=-0.1', 'learning_rate must be >= 0'),
    ('--max_iters=-5', 'max_iters must be >= 0'),
    ('--dropout=1.0', 'dropout must be in [0, 1)'),
    ('--beta2=nan', 'beta2'),
    ('--grad_clip=-1', 'grad_clip must be >= 0'),
    ('--mlm_probability=0', 'mlm_probability must be in (0, 1)'),
    ('--min_lr=1.0', 'min_lr (1.0) is above learning_rate'),
])
def test_train_ranges(char_data, tmp_path, capsys, monkeypatch, arg, message):
    out = tmp_path / 'out'
    line = cli(train, [f'--data_dir={char_data}', f'--out_dir={out}', arg], capsys, monkeypatch)
    assert message in line
    assert not out.exists()  # refused before anything was written


def test_finetune_ranges_and_bad_regex(tmp_path, capsys, monkeypatch):
    base = ['--data=x.json', f"--out_dir={tmp_path / 'ft'}"]
    assert 'gradient_accumulation_steps must be > 0' in cli(finetune_lora, base + ['--gradient_accumulation_steps=0'],
                                                            capsys, monkeypatch)
    assert 'val_fraction must be in (0, 1)' in cli(finetune_lora, base + ['--val_fraction=1'], capsys, monkeypatch)
    assert 'lora_r must be > 0' in cli(finetune_lora, base + ['--lora_r=0'], capsys, monkeypatch)
    assert 'not attn, mlp, all or a valid regex' in cli(finetune_lora, base + ['--lora_targets=attn(['],
                                                        capsys, monkeypatch)


def test_serve_refuses_a_port_out_of_range(capsys, monkeypatch):
    assert 'port must be in 0..65535' in cli(chat_ui, ['--init_from=gpt2', '--port=99999'], capsys, monkeypatch)


def test_a_torn_metrics_line_is_dropped_on_resume(char_data, tmp_path):
    args = [f'--data_dir={char_data}', f'--out_dir={tmp_path}', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--batch_size=4', '--eval_interval=4', '--eval_iters=1', '--log_interval=1',
            '--device=cpu', '--dtype=float32']
    train.main(args + ['--max_iters=4'])
    metrics = tmp_path / 'metrics.jsonl'
    with open(metrics, 'a') as f:
        f.write('{"iter": 5, "loss": 4.1')  # the crash cut this line
    train.main(args + ['--max_iters=8', '--init_from=resume'])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r['iter'] for r in records if 'loss' in r and 'val_loss' not in r] == list(range(1, 9))  # once each


def test_rc_and_one_line_through_the_interpreter(tmp_path):
    # the same rule with a real interpreter start, once per kind of refusal
    a_file = tmp_path / 'f'
    a_file.write_text('x')
    for script, args in (('train.py', ['--batch_size=0']), ('sample.py', [f'--output={tmp_path}']),
                         ('rag.py', ['index', f'--docs={tmp_path}', f'--index={a_file}'])):
        p = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (script, p.stderr)

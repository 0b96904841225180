import os
import subprocess
import sys

import pytest

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=64',
                '--block_size=32', '--batch_size=8', '--max_iters=100', '--eval_interval=100', '--eval_iters=2',
                '--learning_rate=3e-3', '--device=cpu', '--model_type=llama'])
    return out


def sample(*args):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=REPO, capture_output=True, text=True)


def test_sample_from_a_fresh_checkpoint(trained):
    p = sample(f'--out_dir={trained}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40', '--seed=1')
    assert p.returncode == 0, p.stderr
    texts = [t for t in p.stdout.split('---------------') if 'ROMEO:' in t]
    assert len(texts) == 2
    assert all(len(t.strip().split('ROMEO:', 1)[1]) > 0 for t in texts)
    again = sample(f'--out_dir={trained}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40', '--seed=1')
    strip = lambda s: [line for line in s.splitlines() if not line.startswith('-----')]  # timings differ
    assert strip(again.stdout) == strip(p.stdout)  # the seed makes sampling repeatable


def test_greedy_prompt_from_file_and_overlong_prompt(trained, tmp_path):
    prompt = tmp_path / 'p.txt'
    prompt.write_text('To be, or not to be' * 5)  # 95 characters > block_size 32
    p = sample(f'--out_dir={trained}', f'--start=FILE:{prompt}', '--num_samples=1', '--max_new_tokens=10',
               '--temperature=0')
    assert p.returncode == 0, p.stderr
    assert 'only the last 32 (block_size) are seen' in p.stdout
    assert p.stdout.splitlines()[1].startswith('To be, or not to be')


@pytest.mark.parametrize('args,message', [
    (['--start=ROMEO \u2603'], "character '\u2603' is not in this dataset's vocabulary"),
    (['--start=FILE:/nonexistent.txt'], "prompt file '/nonexistent.txt' not found"),
    (['--temperature=-1'], 'temperature and top_k >= 0'),
])
def test_sample_errors(trained, args, message):
    p = sample(f'--out_dir={trained}', *args)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sample_without_checkpoint(tmp_path):
    p = sample(f'--out_dir={tmp_path}')
    assert p.returncode == 2 and 'no checkpoint at' in p.stderr

"""No file the project loads can run code: a pickle payload planted in every kind of checkpoint never runs, and
the refusal is one line that names the file and --trust_checkpoint=True, which loads a trusted old file."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import chat_ui
import finetune_lora
import quantize
import rag
import sample
import train
from train import UserError

from conftest import shared_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling this calls open(marker, 'w'): the file appearing means code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.fixture(scope='module')
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=32',
                '--block_size=32', '--batch_size=4', '--max_iters=4', '--eval_interval=4', '--eval_iters=1',
                '--device=cpu', '--dtype=float32'])
    return out


def plant(trained, folder, marker, **extra):
    """A copy of the trained run whose ckpt.pt still loads as a model, plus a payload (under extra's keys)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(trained):
        shutil.copy(os.path.join(trained, name), folder)
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    torch.save({**ckpt, 'hook': Payload(marker), **extra}, os.path.join(folder, 'ckpt.pt'))
    return str(folder)


def refused(call, marker):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert '\n' not in msg and '--trust_checkpoint=True' in msg and 'pickle' in msg, msg
    assert not os.path.exists(marker), 'the payload ran'
    return msg


def test_a_fresh_checkpoint_loads_weights_only(trained):
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    assert {'model', 'optimizer', 'model_args', 'meta', 'config', 'rng'} <= set(ckpt)
    model, _ = train.load_model(str(trained))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_payload_never_runs_in_any_script(trained, char_data, tmp_path):
    marker = str(tmp_path / 'pwned')
    bad = plant(trained, tmp_path / 'bad', marker)
    path = os.path.join(bad, 'ckpt.pt')
    assert path in refused(lambda: sample.main([f'--init_from={bad}', '--max_new_tokens=2', '--device=cpu']), marker)
    refused(lambda: train.main([f'--data_dir={char_data}', f'--out_dir={bad}', '--init_from=resume',
                                '--max_iters=6', '--device=cpu']), marker)
    refused(lambda: chat_ui.main([f'--init_from={bad}', '--port=0']), marker)
    refused(lambda: quantize.main([f'--init_from={bad}', '--mode=int8', '--decode_tokens=0']), marker)
    refused(lambda: rag.main(['index', f"--docs={shared_file('docs')}", f"--index={tmp_path / 'idx'}",
                              f'--embed_from={bad}']), marker)
    refused(lambda: rag.tuned_pooling(bad), marker)
    refused(lambda: finetune_lora.merged_adapters(bad), marker)
    # an adapter file: the payload must not run even before "is not an adapter"
    adapter = str(tmp_path / 'adapter.pt')
    torch.save({'lora': {}, 'lora_config': {}, 'fingerprint': 0.0, 'hook': Payload(marker)}, adapter)
    refused(lambda: finetune_lora.read_adapter(adapter), marker)
    refused(lambda: finetune_lora.main([f'--init_from={trained}', f'--adapter={adapter}', '--data=x.json',
                                        f"--out_dir={tmp_path / 'ft'}"]), marker)


def test_payload_in_a_hugging_face_pytorch_model_bin(tmp_path):
    transformers = pytest.importorskip('transformers')
    folder = tmp_path / 'hf'
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100).save_pretrained(folder)
    marker = str(tmp_path / 'pwned')
    torch.save({'transformer.wte.weight': torch.zeros(100, 16), 'hook': Payload(marker)}, folder / 'pytorch_model.bin')
    with pytest.raises(UserError, match='weights-only') as e:
        train.load_model(str(folder))
    assert '\n' not in str(e.value) and not os.path.exists(marker)


def test_command_line_refusal_is_one_line(trained, tmp_path):
    marker = str(tmp_path / 'pwned')
    bad = plant(trained, tmp_path / 'bad', marker)
    p = subprocess.run([sys.executable, 'sample.py', f'--init_from={bad}', '--max_new_tokens=2'], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 2 and not os.path.exists(marker)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Payload' not in p.stdout, p.stderr


def test_old_checkpoint_loads_only_when_trusted(trained, tmp_path, capsys):
    # before this rule, checkpoints kept numpy's RNG state: loading that needs pickle
    old = plant(trained, tmp_path / 'old', tmp_path / 'unused')
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    torch.save({**ckpt, 'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state()}},
               os.path.join(old, 'ckpt.pt'))
    with pytest.raises(UserError, match=r'numpy.*--trust_checkpoint=True'):
        train.load_model(old)
    sample.main([f'--init_from={old}', '--max_new_tokens=3', '--num_samples=1', '--device=cpu',
                 '--trust_checkpoint=True'])
    assert 'loading' in capsys.readouterr().err  # the warning says pickle was used


@pytest.mark.parametrize('content, message', [
    (b'', 'not a readable checkpoint'),
    (b'\x00\x01garbage' * 100, 'not a readable checkpoint'),
    (None, 'not a readable checkpoint'),  # a real checkpoint cut in half
])
def test_damaged_checkpoints_are_one_line(trained, tmp_path, content, message):
    path = tmp_path / 'ckpt.pt'
    if content is None:
        full = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
        content = full[:len(full) // 2]
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        train.load_checkpoint(str(path))
    assert '\n' not in str(e.value)


def test_a_checkpoint_that_does_not_match_its_model_args(trained, tmp_path):
    folder = plant(trained, tmp_path / 'cut', tmp_path / 'unused')
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    ckpt['model'] = {k: v for i, (k, v) in enumerate(ckpt['model'].items()) if i % 2}
    torch.save(ckpt, os.path.join(folder, 'ckpt.pt'))
    with pytest.raises(UserError, match='does not match its model_args: .* missing') as e:
        train.load_model(folder)
    assert '\n' not in str(e.value)
    ckpt['model'] = 'not a dict'
    torch.save(ckpt, os.path.join(folder, 'ckpt.pt'))
    with pytest.raises(UserError, match='not a model checkpoint'):
        train.load_model(folder)

"""prepare.py --tokenizer=bpe: trained on the train split or loaded from a file, saved beside meta.json, copied
into checkpoints by train.py, decoded by sample.py without the data folder.

    python -m pytest tests/test_prepare_bpe.py -q
"""
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from operator import attrgetter

import bpe
import prepare
import train
from conftest import shared_file
from train import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def shakespeare():
    with open(shared_file('tinyshakespeare.txt'), encoding='utf-8') as f:
        return f.read()


def run(out_dir, *args):
    """prepare.main on Tiny Shakespeare as --dataset=text; returns (meta as train.py sees it, train, val)."""
    prepare.main(['--dataset=text', f"--input={shared_file('tinyshakespeare.txt')}", '--tokenizer=bpe', *args,
                  f'--out_dir={out_dir}'])
    return train.load_data(str(out_dir))


def test_trained_on_the_train_split_and_round_trips(tmp_path, shakespeare):
    meta, data = run(tmp_path / 'd', '--vocab_size=512')
    tok = meta['tokenizer']
    assert tok['kind'] == 'bpe' and tok['file'] == 'tokenizer.model' and meta['vocab_size'] == 512
    assert meta['eot_token'] == 509 and meta['dtype'] == 'uint16'  # then <|im_start|> 510, <|im_end|> 511
    on_disk = json.loads((tmp_path / 'd' / 'meta.json').read_text())
    assert 'model' not in on_disk['tokenizer']  # meta.json stays small; train.load_data adds the text in memory
    saved = bpe.Tokenizer.load(str(tmp_path / 'd' / 'tokenizer.model'))
    assert tok['model'] == saved.dumps()
    cut = int(len(shakespeare) * 0.9)
    assert saved.ranks == bpe.train(shakespeare[:cut], 512, special_tokens=prepare.CHAT_TOKENS,
                                    progress=False).ranks  # never saw val
    assert saved.ranks != bpe.train(shakespeare, 512, special_tokens=prepare.CHAT_TOKENS, progress=False).ranks
    assert saved.chat_template == bpe.CHATML_TEMPLATE and saved.special_tokens['<|im_end|>'] == 511
    encode, decode = attrgetter('encode', 'decode')(train.meta_tokenizer(meta))
    train_ids, val_ids = (np.concatenate(data[s]).tolist() for s in ('train', 'val'))
    assert decode(train_ids) == shakespeare[:cut] and decode(val_ids) == shakespeare[cut:]
    assert val_ids == encode(shakespeare[cut:])
    assert decode([0xe2, 5000, 10**9]) == '\ufffd'  # half a character and ids outside the vocabulary: no crash


def test_tokenizer_path_no_op_rerun_and_vocab_change(tmp_path, shakespeare, capsys):
    model = tmp_path / 'tok.model'
    bpe.train(shakespeare[:50_000], 300, progress=False).save(model)
    meta, data = run(tmp_path / 'd', f'--tokenizer_path={model}')
    assert meta['vocab_size'] == 300 and (tmp_path / 'd' / 'tokenizer.model').read_bytes() == model.read_bytes()
    decode = train.meta_tokenizer(meta).decode
    assert decode(np.concatenate(data['val']).tolist()) == shakespeare[int(len(shakespeare) * 0.9):]
    capsys.readouterr()
    run(tmp_path / 'd', f'--tokenizer_path={model}')
    assert 'already prepared' in capsys.readouterr().out
    bpe.train(shakespeare[:50_000], 320, progress=False).save(model)  # another tokenizer at the same path
    assert run(tmp_path / 'd', f'--tokenizer_path={model}')[0]['vocab_size'] == 320
    assert 'already prepared' not in capsys.readouterr().out

    run(tmp_path / 't', '--vocab_size=400')
    capsys.readouterr()
    run(tmp_path / 't', '--vocab_size=400')
    assert 'already prepared' in capsys.readouterr().out
    assert run(tmp_path / 't', '--vocab_size=420')[0]['vocab_size'] == 420
    assert 'already prepared' not in capsys.readouterr().out
    prepare.main(['--dataset=text', f"--input={shared_file('tinyshakespeare.txt')}", f"--out_dir={tmp_path / 't'}"])
    assert not (tmp_path / 't' / 'tokenizer.model').exists()  # char data now: no stale tokenizer beside it


def test_train_then_sample_without_the_data_folder(tmp_path):
    data = tmp_path / 'data'
    run(data, '--vocab_size=512')
    out = tmp_path / 'out'
    train.main([f'--data_dir={data}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=32',
                '--block_size=32', '--batch_size=4', '--max_iters=4', '--eval_interval=4', '--eval_iters=1',
                '--dtype=float32', '--device=cpu'])
    shutil.rmtree(data)
    p = subprocess.run([sys.executable, 'sample.py', f'--init_from={out}', '--start=ROMEO:', '--num_samples=1',
                        '--max_new_tokens=20', '--device=cpu'], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith('ROMEO:')


def test_streaming_with_a_tokenizer_file(tmp_path, shakespeare):
    model = tmp_path / 'tok.model'
    tok = bpe.train(shakespeare[:50_000], 300, progress=False)
    tok.save(model)
    docs = [shakespeare[i:i + 2000] for i in range(0, 40_000, 2000)]
    shard = tmp_path / 'a.jsonl.gz'
    with gzip.open(shard, 'wt', encoding='utf-8') as f:
        f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
    out = tmp_path / 's'
    prepare.main(['--dataset=urls', f'--input={shard}', '--tokenizer=bpe', f'--tokenizer_path={model}',
                  '--val_tokens=1000', '--num_proc=2', f'--out_dir={out}'])
    meta, data = train.load_data(str(out))
    assert meta['vocab_size'] == 300 and meta['eot_token'] == tok.eot_token
    decode = train.meta_tokenizer(meta).decode
    val, train_ = (decode(np.concatenate(data[s]).tolist()) for s in ('val', 'train'))
    assert val + bpe.ENDOFTEXT + train_ == bpe.ENDOFTEXT.join(docs)  # eot between documents, not between files
    (out / 'tokenizer.model').unlink()
    prepare.main(['--dataset=urls', f'--input={shard}', '--tokenizer=bpe', f'--tokenizer_path={model}',
                  '--val_tokens=1000', '--num_proc=1', f'--out_dir={out}'])
    assert (out / 'tokenizer.model').exists()  # made again, with its tokenizer
    assert train.load_data(str(out))[0]['train_tokens'] == meta['train_tokens']


@pytest.mark.parametrize('args, message', [
    (['--vocab_size=0'], 'needs --vocab_size of at least 259'),
    (['--vocab_size=258'], r'at least 259 \(256 bytes and <\|endoftext\|>, <\|im_start\|>, <\|im_end\|>;'),
    (['--vocab_size=256', '--chat_tokens=False'], r'at least 257 \(256 bytes and <\|endoftext\|>;'),
    (['--tokenizer_path=/nonexistent/tok.model'], 'cannot be read'),
    (['--vocab_size=512', '--tokenizer_path=x'], 'not both'),
])
def test_errors(tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        run(tmp_path / 'd', *args)


def test_file_errors(tmp_path, shakespeare):
    bad = tmp_path / 'bad.model'
    bad.write_text('hello\n')
    with pytest.raises(UserError, match='is not a bpe.py tokenizer file'):
        run(tmp_path / 'd', f'--tokenizer_path={bad}')
    bpe.train(shakespeare[:10_000], 300, special_tokens=(), progress=False).save(bad)
    with pytest.raises(UserError, match='has no <|endoftext|> token'):
        run(tmp_path / 'd', f'--tokenizer_path={bad}')
    with pytest.raises(UserError, match='are for --tokenizer=bpe'):
        prepare.main(['--dataset=pydocs', '--vocab_size=512', f'--out_dir={tmp_path / "p"}'])
    with pytest.raises(UserError, match='cannot train a tokenizer on its stream'):
        prepare.main(['--dataset=urls', '--input=a.jsonl', '--tokenizer=bpe', '--vocab_size=512'])

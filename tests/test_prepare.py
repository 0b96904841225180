"""Tests for prepare.py: every dataset, the errors a user can hit, no-op re-runs, atomic writes, downloads.

    python -m pytest tests/test_prepare.py -q
"""
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import prepare
import train
from conftest import shared_file
from train import UserError
import configurator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSED_PORT_URL = 'http://127.0.0.1:9/input.txt'  # the discard port: nothing listens, so connecting fails at once
SHAKESPEARE = functools.partial(shared_file, 'tinyshakespeare.txt')  # the path, or skip the test


@pytest.fixture
def shakespeare():
    with open(SHAKESPEARE(), encoding='utf-8') as f:
        return f.read()


@pytest.fixture
def gpt2_offline(monkeypatch):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))


def run(tmp_path, *args, out='out'):
    """prepare.main with out_dir and cache_dir inside tmp_path; returns (meta, decoded train, decoded val)."""
    out_dir = tmp_path / out
    prepare.main([*args, f'--out_dir={out_dir}', f'--cache_dir={tmp_path / "cache"}'])
    meta, data = train.load_data(str(out_dir))  # the way train.py reads it
    decode = train.meta_tokenizer(meta).decode
    return meta, decode(np.concatenate(data['train']).tolist()), decode(np.concatenate(data['val']).tolist())


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path

# ----------------------------------------------------------------------------------------------------------
# datasets


def test_shakespeare_char_matches_nanogpt(tmp_path, shakespeare):
    meta, train_text, val_text = run(tmp_path, '--dataset=shakespeare_char', f'--input={SHAKESPEARE()}')
    assert meta['vocab_size'] == 65 and meta['dtype'] == 'uint16' and meta['eot_token'] is None
    assert (meta['train_tokens'], meta['val_tokens']) == (1_003_854, 111_540)  # nanoGPT's numbers
    assert train_text + val_text == shakespeare
    assert meta['sha256'] == '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'  # the file's
    assert meta['tokenizer'] == {'kind': 'char', 'chars': sorted(set(shakespeare))}
    assert meta['prepare_version'] == 1 and meta['source'] == SHAKESPEARE()


def test_shakespeare_gpt2_matches_nanogpt(tmp_path, shakespeare, gpt2_offline):
    meta, train_text, val_text = run(tmp_path, '--dataset=shakespeare', f'--input={SHAKESPEARE()}')
    assert meta['vocab_size'] == 50257 and meta['eot_token'] == 50256 and meta['dtype'] == 'uint16'
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'}
    assert (meta['train_tokens'], meta['val_tokens']) == (301_966, 36_059)  # nanoGPT's numbers
    assert train_text + val_text == shakespeare


def test_pieces_do_not_change_gpt2_tokens(shakespeare, gpt2_offline):
    enc = configurator.tiktoken_encoding('gpt2')
    text = shakespeare[:50_000] + "\nx  \nY\n's\n \n\t\nend\n\n\nok\r\nz"
    for size in (1, 10, 1000):
        chunks = list(prepare.pieces(text, size))
        assert ''.join(chunks) == text and len(chunks) > 10
        assert [t for c in chunks for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


def test_text_single_file(tmp_path):
    text = 'Notes\n\nSome *markdown* text, with ünïcödé and emoji 🙂.\n' * 20
    meta, train_text, val_text = run(tmp_path, '--dataset=text', f'--input={write(tmp_path / "a.md", text)}')
    assert train_text + val_text == text and len(val_text) == len(text) // 10
    assert meta['dataset'] == 'text' and meta['vocab_size'] == len(set(text))


def test_text_folder_skips_bad_files(tmp_path, capsys):
    folder = tmp_path / 'corpus'
    write(folder / 'b.txt', 'second document ' * 10)
    write(folder / 'a' / 'first.md', 'first document ' * 10)
    write(folder / 'blob.txt', b'PK\x03\x04\x00\x00binary')  # NUL bytes
    write(folder / 'latin1.txt', 'café'.encode('latin-1'))  # not UTF-8
    write(folder / 'notes.py', 'print("not a text extension, so not read")')
    meta, train_text, val_text = run(tmp_path, '--dataset=text', f'--input={folder}')
    assert 'skipped 2 binary/non-UTF-8 files' in capsys.readouterr().out
    assert train_text + val_text == 'first document ' * 10 + '\n\n' + 'second document ' * 10  # sorted paths


def test_text_glob(tmp_path):
    write(tmp_path / 'd' / 'a.md', 'markdown one ' * 5)
    write(tmp_path / 'd' / 'sub' / 'b.md', 'markdown two ' * 5)  # sorted by path
    write(tmp_path / 'd' / 'z.txt', 'not matched')
    meta, train_text, val_text = run(tmp_path, '--dataset=text', f'--input={tmp_path}/d/**/*.md')
    assert train_text + val_text == 'markdown one ' * 5 + '\n\n' + 'markdown two ' * 5
    assert meta['source'] == f'{tmp_path}/d/**/*.md'


def test_text_jsonl_gpt2_separates_documents(tmp_path, capsys, gpt2_offline):
    lines = [json.dumps({'text': f'Document number {i} says hello.', 'id': i}) for i in range(5)]
    lines[2:2] = ['{"text": "oops', json.dumps({'title': 'no text field'}), '', json.dumps(['a', 'list'])]
    path = write(tmp_path / 'docs.jsonl', '\n'.join(lines) + '\n')
    meta, train_text, val_text = run(tmp_path, '--dataset=text', f'--input={path}', '--tokenizer=gpt2')
    assert 'skipped 3 jsonl lines' in capsys.readouterr().out
    tokens = np.concatenate([np.fromfile(tmp_path / 'out' / f'{s}.bin', np.uint16) for s in ('train', 'val')])
    assert (tokens == 50256).sum() == 4  # <|endoftext|> between the 5 documents
    assert train_text + val_text == '<|endoftext|>'.join(f'Document number {i} says hello.' for i in range(5))


def test_char_vocab_over_65536_uses_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF][:66_000]
    text = ''.join(chars)
    meta, train_text, val_text = run(tmp_path, '--dataset=text', f'--input={write(tmp_path / "u.txt", text)}')
    assert meta['dtype'] == 'uint32' and meta['vocab_size'] == 66_000
    assert train_text + val_text == text


def test_pydocs_is_offline_deterministic_and_large(tmp_path):
    meta, train_text, val_text = run(tmp_path, '--dataset=pydocs')
    assert meta['dataset'] == 'pydocs' and meta['tokenizer']['kind'] == 'char'
    assert meta['train_tokens'] + meta['val_tokens'] > 1_000_000 and meta['vocab_size'] > 80
    assert 'json.dumps' in train_text + val_text
    docs = prepare.pydocs_documents()  # the same again, from scratch
    assert prepare.text_sha256(docs, 'char') == meta['sha256']

# ----------------------------------------------------------------------------------------------------------
# errors: one line that says what to do


@pytest.mark.parametrize('files, args, message', [
    ({'empty.txt': ''}, ['--input={}/empty.txt'], 'has no text'),
    ({'blank.txt': '  \n\n '}, ['--input={}/blank.txt'], 'has no text'),
    ({}, ['--input={}/missing.txt'], "input '{}/missing.txt' not found"),
    ({'bin/a.txt': b'\x00\x01', 'bin/b.md': b'\xff\xfe\x00x'}, ['--input={}/bin'], 'all 2 files are binary'),
    ({'one.txt': b'caf\xe9'}, ['--input={}/one.txt'], 'is not UTF-8'),
    ({'bad.jsonl': '{"title": 1}\nnot json\n'}, ['--input={}/bad.jsonl'], 'has no text (2 jsonl lines'),
    ({'e/x.csv': 'a,b'}, ['--input={}/e'], 'no .txt, .md, .jsonl files'),
    ({}, ['--input={}/*.nothing'], 'no files match'),
    ({'tiny.txt': 'abc'}, ['--input={}/tiny.txt'], 'the val split would have 1 tokens'),
    ({'t.txt': 'x' * 100}, ['--input={}/t.txt', '--val_fraction=0.0'], 'val_fraction must be between 0 and 1'),
    ({'t.txt': 'x' * 100}, ['--input={}/t.txt', '--tokenizer=wordpiece'], 'tokenizer must be char, gpt2 or bpe'),
    ({}, [], '--dataset=text needs --input'),
])
def test_text_errors(tmp_path, files, args, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(UserError, match=message.format(tmp_path).replace('(', r'\(').replace('*', r'\*')):
        prepare.main(['--dataset=text', f'--out_dir={tmp_path / "out"}'] + [a.format(tmp_path) for a in args])
    assert not (tmp_path / 'out' / 'meta.json').exists()


def test_other_config_errors(tmp_path):
    with pytest.raises(UserError, match='unknown dataset'):
        prepare.main(['--dataset=wikipedia'])
    with pytest.raises(UserError, match='takes no --input'):
        prepare.main(['--dataset=pydocs', '--input=x.txt'])
    with pytest.raises(UserError, match='did you mean val_fraction'):
        prepare.main(['--val_fractoin=0.2'])


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    for args, message in [(['--dataset=text', f'--input={tmp_path}/nope'], 'not found'),
                          (['--dataset=shakespeare_char', f'--url={CLOSED_PORT_URL}'], 'could not download')]:
        r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith('error: ') and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert '--input=PATH' in r.stderr and '--dataset=pydocs' in r.stderr  # the offline choices are named
    assert not (tmp_path / 'data').exists()  # an explicit dataset does not fall back, and leaves nothing


def test_no_arguments_offline_falls_back_to_pydocs(tmp_path):
    # `python prepare.py` exactly as a user types it; the proxy on a closed port makes the download fail
    env = {**os.environ, 'HTTPS_PROXY': CLOSED_PORT_URL, 'https_proxy': CLOSED_PORT_URL, 'NO_PROXY': '', 'no_proxy': ''}
    r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.strip().splitlines()
    assert first.startswith('could not download Tiny Shakespeare (') and 'pydocs' in first
    meta, data = train.load_data(str(tmp_path / 'data' / 'shakespeare_char'))  # train.py's default data_dir
    assert meta['dataset'] == 'pydocs' and sum(map(len, data['train'])) > 1_000_000
    assert not (tmp_path / 'data' / '.cache').exists()  # a failed download leaves nothing behind

# ----------------------------------------------------------------------------------------------------------
# re-runs and atomic writes


def test_rerun_is_a_noop(tmp_path, capsys, shakespeare):
    args = ['--dataset=shakespeare_char', f'--input={SHAKESPEARE()}', f'--out_dir={tmp_path}']
    prepare.main(args)
    mtimes = [os.stat(tmp_path / f).st_mtime_ns for f in ('train.bin', 'val.bin', 'meta.json')]
    capsys.readouterr()
    prepare.main(args)
    assert capsys.readouterr().out.startswith('already prepared')
    assert [os.stat(tmp_path / f).st_mtime_ns for f in ('train.bin', 'val.bin', 'meta.json')] == mtimes
    prepare.main(args + ['--val_fraction=0.2'])  # a different setting is rebuilt
    assert json.loads((tmp_path / 'meta.json').read_text())['val_tokens'] == 223_079
    (tmp_path / 'val.bin').write_bytes(b'')  # damaged output is rebuilt too
    prepare.main(args + ['--val_fraction=0.2'])
    assert 'wrote' in capsys.readouterr().out and os.path.getsize(tmp_path / 'val.bin') == 2 * 223_079


def failing_save(monkeypatch, fail_on):
    """Make prepare.save_split write its file and then crash when it writes the split named fail_on."""
    real = prepare.save_split

    def save(tokens, path):
        real(tokens, path)
        if os.path.basename(path).startswith(fail_on):
            raise RuntimeError('disk full (simulated)')
    monkeypatch.setattr(prepare, 'save_split', save)


def test_crash_leaves_no_partial_output(tmp_path, monkeypatch):
    path = write(tmp_path / 'in.txt', 'some text to prepare\n' * 50)
    failing_save(monkeypatch, 'val')
    with pytest.raises(RuntimeError, match='simulated'):
        prepare.main(['--dataset=text', f'--input={path}', f'--out_dir={tmp_path / "out"}'])
    assert os.listdir(tmp_path / 'out') == []  # no train.bin, val.bin, meta.json or temporary files


def test_crash_keeps_previous_output_intact(tmp_path, monkeypatch):
    path = write(tmp_path / 'in.txt', 'some text to prepare\n' * 50)
    args = ['--dataset=text', f'--input={path}', f'--out_dir={tmp_path / "out"}']
    prepare.main(args)
    before = {f: (tmp_path / 'out' / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')}
    failing_save(monkeypatch, 'val')
    with pytest.raises(RuntimeError, match='simulated'):
        prepare.main(args + ['--val_fraction=0.5'])
    assert {f: (tmp_path / 'out' / f).read_bytes() for f in sorted(os.listdir(tmp_path / 'out'))} == before

# ----------------------------------------------------------------------------------------------------------
# downloads and tokenizers


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for tmp_path/www; yields (base url, list of paths requested)."""
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass  # keep the test output quiet

    (tmp_path / 'www').mkdir()
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                            functools.partial(Handler, directory=str(tmp_path / 'www')))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', requested
    httpd.shutdown()
    httpd.server_close()


def test_download_caches_and_prepares(tmp_path, server):
    base, requested = server
    text = 'First Citizen:\nBefore we proceed any further, hear me speak.\n\n' * 30
    write(tmp_path / 'www' / 'input.txt', text)
    meta, train_text, val_text = run(tmp_path, '--dataset=shakespeare_char', f'--url={base}/input.txt')
    assert requested == ['/input.txt'] and meta['source'] == f'{base}/input.txt'
    assert train_text + val_text == text
    assert [f for f in os.listdir(tmp_path / 'cache') if f.endswith('input.txt')]  # cached, no .part left
    run(tmp_path, '--dataset=shakespeare_char', f'--url={base}/input.txt', out='out2')
    assert requested == ['/input.txt']  # the second run used the cache
    with pytest.raises(UserError, match=r'could not download .*\(HTTP 404\)'):
        run(tmp_path, '--dataset=shakespeare_char', f'--url={base}/missing.txt')
    assert not [f for f in os.listdir(tmp_path / 'cache') if 'missing' in f]


def test_char_tokenizer():
    tok = train.meta_tokenizer({'tokenizer': {'kind': 'char', 'chars': ['\n', ' ', 'a', 'b']}})
    encode, decode = tok.encode, tok.decode
    assert encode('ab a\n') == [2, 3, 1, 2, 0] and decode([2, 3, 1, 2, 0]) == 'ab a\n'
    with pytest.raises(UserError, match="character 'z' is not in"):
        encode('abz')
    assert decode([2, 99]) == 'a\ufffd'  # ids past the vocabulary (a padded model) do not crash


def test_gpt2_tokenizer(gpt2_offline):
    tok = train.meta_tokenizer({'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'}})
    encode, decode = tok.encode, tok.decode
    assert encode('hello world') == [31373, 995]
    assert encode('a<|endoftext|>b')[1] == 50256
    assert decode(encode('héllo 🙂<|endoftext|>')) == 'héllo 🙂<|endoftext|>'
    half_emoji = encode('🙂')[:1]
    assert decode(half_emoji) == '\ufffd' or '\ufffd' in decode(half_emoji)  # invalid bytes: no crash
    assert decode([31373, 50300]) == 'hello'  # ids past the vocabulary are dropped


def test_unknown_tokenizer_kind():
    with pytest.raises(UserError, match='unknown tokenizer'):
        train.meta_tokenizer({'tokenizer': {'kind': 'sentencepiece'}})

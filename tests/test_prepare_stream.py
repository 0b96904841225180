"""Tests for prepare.py's streaming datasets (urls, dolma, c4, fineweb_edu) against a local HTTP server:
counts, round trips, num_proc, max_tokens, resume after a kill, broken downloads and damaged shards.

    python -m pytest tests/test_prepare_stream.py -q
"""
import base64
import collections
import gzip
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import prepare
from conftest import shared_file
from train import UserError, load_data
import configurator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = '<|endoftext|>'
ARGS = ['--min_chars=10', '--val_tokens=600', '--shard_tokens=1000', '--num_proc=1']
WORDS = '''the of and to in is was for on that with as by at from his her it an be this are which or had not but
what all were when we there can more if out so said up its about into than them only other new some could time
these two may then do first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too little state good
very make world still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three'''.split()


def documents(shard, n):
    rng = random.Random(shard)
    return [f'Shard {shard}, document {i}: ' + ' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 100)))
            for i in range(n)]


def shard_records():
    """{file name: records}; a record is a JSON value, or a str line written as it is (not JSON)."""
    d0, d1, d2 = documents(0, 30), documents(1, 30), documents(2, 30)
    # shard1's records carry another field, so that half the file is more than the 64 kB a download writes at
    # a time: then a test can see a partial download on disk
    rng = random.Random(1)
    pad = lambda: base64.b64encode(rng.randbytes(4500)).decode()
    return {
        'shard0.jsonl.gz': [{'text': d, 'id': i} for i, d in enumerate(d0[:10])] + [
            {'text': 'hi'}, {'text': '   \n  '},                     # too short (min_chars=10, outer space ignored)
            '{"text": "oops', {'id': 1}, ['a list'], {'text': 7},    # bad: not JSON, no "text" string
            {'text': 'Ünïcödé 🙂 and half an emoji: \ud83d, then more words'},  # a lone surrogate becomes U+FFFD
            {'text': f'a document that mentions {EOT} as plain text'},  # not an eot token
            {'text': d0[3]}] + [{'text': d} for d in d0[10:]],     # a duplicate within the shard
        'shard1.jsonl.gz': [{'text': d0[5]}] + [{'text': d, 'pad': pad()} for d in d1] + [{'text': d0[6]},
                                                                                           {'text': 'short'}],
        'shard2.jsonl.gz': [{'text': d} for d in d2[:15]] + [{'text': d1[0]}] + [{'text': d} for d in d2[15:]],
    }


def expected_documents():
    """(kept texts in order, counts) by the rules prepare.py promises, worked out here independently."""
    kept, counts = [], collections.Counter()
    for records in shard_records().values():
        for r in records:
            counts['seen'] += 1
            if not (isinstance(r, dict) and isinstance(r.get('text'), str)):
                counts['bad'] += 1
            elif len(r['text'].strip()) < 10:
                counts['too_short'] += 1
            elif r['text'] in kept:
                counts['duplicates'] += 1
            else:
                kept.append(r['text'].encode('utf-8', 'surrogatepass').decode('utf-8', 'replace'))
    counts['kept'] = len(kept)
    return kept, {k: counts[k] for k in ('seen', 'kept', 'duplicates', 'too_short', 'bad')}


def write_shards(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in shard_records().items():
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        lines.insert(3, '')  # a blank line is skipped, not counted
        (folder / name).write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode(), mtime=0))
    (folder / 'list.txt').write_text('# the shards, relative to this list\n' + '\n'.join(shard_records()) + '\n')

# ----------------------------------------------------------------------------------------------------------
# a local server that counts requests, takes Range requests and can misbehave


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server.state
        srv.requests[self.path] += 1
        path = os.path.join(srv.root, self.path.lstrip('/'))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, 'rb') as f:
            data = f.read()
        start, asked = 0, self.headers.get('Range')
        if asked:
            srv.ranges.append((self.path, asked))
            start = int(re.fullmatch(r'bytes=(\d+)-', asked)[1])
            if srv.ignore_range:
                start, asked = 0, None
            elif start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.end_headers()
                return
        self.send_response(206 if asked else 200)
        self.send_header('Content-Length', str(len(data) - start))
        if asked:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        body = data[start:]
        if self.path in srv.short or self.path in srv.hang:  # promise all, send half, close the connection
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if srv.short.get(self.path) == 'once':
                del srv.short[self.path]
            if self.path in srv.hang:
                srv.hanging.set()
                srv.release.wait(60)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # keep the test output quiet


class Server:
    def __init__(self, root):
        self.root, self.requests, self.ranges = str(root), collections.Counter(), []
        self.short = {}  # path: 'once' or 'always'
        self.hang = set()  # paths that send half and then wait for release
        self.ignore_range = False  # answer Range requests with the whole file
        self.hanging, self.release = threading.Event(), threading.Event()

    def reset(self):
        self.requests.clear()
        self.ranges.clear()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The shards in tmp_path/www behind http://127.0.0.1:PORT; also makes gpt2 offline and retries instant."""
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))
    monkeypatch.setattr(prepare.time, 'sleep', lambda s: None)
    write_shards(tmp_path / 'www')
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.daemon_threads = True
    httpd.state = srv = Server(tmp_path / 'www')
    srv.base = f'http://127.0.0.1:{httpd.server_address[1]}'
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.release.set()
    httpd.shutdown()
    httpd.server_close()


def stream_args(tmp_path, srv, *args, out='out', cache='cache', dataset='urls', input='list.txt'):
    return [f'--dataset={dataset}', f'--input={srv.base}/{input}', *ARGS, *args,
            f'--out_dir={tmp_path / out}', f'--cache_dir={tmp_path / cache}']


def run(tmp_path, srv, *args, **kw):
    prepare.main(stream_args(tmp_path, srv, *args, **kw))
    return tmp_path / kw.get('out', 'out')


def read_output(out):
    meta = json.loads((out / 'meta.json').read_text())
    val = np.fromfile(out / 'val.bin', dtype=meta['dtype'])
    train = np.concatenate([np.fromfile(out / s['file'], dtype=meta['dtype']) for s in meta['train_shards']])
    return meta, val, train


def file_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def decode(tokens):
    return configurator.tiktoken_encoding('gpt2').decode(tokens.tolist())

# ----------------------------------------------------------------------------------------------------------
# output


def test_urls_full_run(tmp_path, server, capsys):
    out = run(tmp_path, server)
    meta, val, train = read_output(out)
    kept, counts = expected_documents()
    assert meta['documents'] == counts and counts['duplicates'] == 4 and counts['bad'] == 4
    assert (meta['dataset'], meta['vocab_size'], meta['eot_token'], meta['dtype']) == ('urls', 50257, 50256, 'uint16')
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'} and meta['source'] == f'{server.base}/list.txt'
    assert (meta['train_tokens'], meta['val_tokens']) == (len(train), len(val))
    shards = meta['train_shards']
    assert [s['file'] for s in shards] == [f'train_{i:05d}.bin' for i in range(len(shards))] and len(shards) >= 5
    assert all(s['tokens'] == 1000 for s in shards[:-1]) and 0 < shards[-1]['tokens'] <= 1000
    assert sorted(os.listdir(out)) == sorted(['meta.json', 'val.bin'] + [s['file'] for s in shards])  # no train.bin
    _, data = load_data(str(out))  # as train.py reads it
    assert np.array_equal(np.concatenate(data['train']), train) and np.array_equal(data['val'][0], val)

    # val: whole documents, the fewest that reach val_tokens; train: the rest; eot between documents
    k = next(k for k in range(len(kept)) if EOT.join(kept[:k]) == decode(val))
    assert decode(train) == EOT.join(kept[k:])
    assert (val == 50256).sum() == k - 1 and (train == 50256).sum() == len(kept) - k - 1
    assert len(val) >= 600 and np.flatnonzero(val == 50256)[-1] < 600

    assert server.requests == {'/list.txt': 1, '/shard0.jsonl.gz': 1, '/shard1.jsonl.gz': 1, '/shard2.jsonl.gz': 1}
    assert all('list' in f for f in os.listdir(tmp_path / 'cache'))  # shards are deleted once tokenized
    assert 'MB/s' in capsys.readouterr().out
    run(tmp_path, server)  # the same command again: nothing to do, nothing downloaded
    assert capsys.readouterr().out.startswith('already prepared') and server.requests['/shard0.jsonl.gz'] == 1


def test_num_proc_and_batches_do_not_change_the_output(tmp_path, server, monkeypatch):
    one = file_bytes(run(tmp_path, server, out='one'))
    monkeypatch.setattr(prepare, 'BATCH_BYTES', 300)  # many small batches in flight
    two = file_bytes(run(tmp_path, server, '--num_proc=2', out='two'))
    assert one == two


def test_dolma_reads_its_url_list(tmp_path, server):
    www = tmp_path / 'www'
    (www / 'urls').mkdir()
    (www / 'urls' / 'v1_6-sample.txt').write_text(''.join(f'{server.base}/{name}\n' for name in shard_records()))
    dolma = run(tmp_path, server, out='dolma', dataset='dolma', input='urls/v1_6-sample.txt')
    urls = run(tmp_path, server, out='urls')
    meta = json.loads((dolma / 'meta.json').read_text())
    assert meta['dataset'] == 'dolma' and meta['source'] == f'{server.base}/urls/v1_6-sample.txt'
    assert {k: v for k, v in file_bytes(dolma).items() if k.endswith('.bin')} == \
        {k: v for k, v in file_bytes(urls).items() if k.endswith('.bin')}
    assert prepare.DOLMA_URLS.endswith('/urls/v1_6-sample.txt')  # the official list is the default


def test_max_tokens_stops_early(tmp_path, server):
    _, full_val, full_train = read_output(run(tmp_path, server, out='full'))
    server.reset()
    meta, val, train = read_output(run(tmp_path, server, '--max_tokens=1.5e3', out='short'))
    assert len(val) + len(train) == 1500 == meta['val_tokens'] + meta['train_tokens']
    assert np.array_equal(val, full_val) and np.array_equal(train, full_train[:len(train)])  # a prefix, cut exactly
    assert meta['source_shards_read'] == 1 and not server.requests['/shard1.jsonl.gz']  # no more downloads
    assert meta['documents']['kept'] < expected_documents()[1]['kept']


def test_local_files_comma_separated(tmp_path, server):
    local = tmp_path / 'local'
    local.mkdir()
    (local / 'a.jsonl').write_text(json.dumps({'text': 'a local jsonl document, plain'}) + '\n')
    (local / 'b.txt.gz').write_bytes(gzip.compress('one gzipped text file is one document\n\nwith two parts'.encode()))
    args = [f'--input={local}/a.jsonl,{server.base}/shard2.jsonl.gz, {local}/b.txt.gz', '--val_tokens=5',
            f'--out_dir={tmp_path / "out"}', f'--cache_dir={tmp_path / "cache"}']
    prepare.main(['--dataset=urls', '--min_chars=10', '--num_proc=1'] + args)
    meta, val, train = read_output(tmp_path / 'out')
    assert decode(val) == 'a local jsonl document, plain'
    assert decode(train).endswith(EOT + 'one gzipped text file is one document\n\nwith two parts')
    assert meta['documents']['kept'] == 2 + 31 and len(meta['train_shards']) == 1  # the default: 1e8 tokens each

# ----------------------------------------------------------------------------------------------------------
# resume: a killed or crashed run continues, downloads nothing twice and ends with the same bytes


def test_killed_run_resumes_without_downloading_again(tmp_path, server):
    reference = file_bytes(run(tmp_path, server, out='ref', cache='ref_cache'))
    server.reset()
    server.hang.add('/shard1.jsonl.gz')  # half of shard1 arrives, then the server stalls until release
    cmd = [sys.executable, os.path.join(REPO, 'prepare.py'), *stream_args(tmp_path, server, '--num_proc=2')]
    with open(tmp_path / 'log', 'w') as log:
        p = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert server.hanging.wait(60), (tmp_path / 'log').read_text()
        deadline, part = time.time() + 30, []
        while not part and time.time() < deadline:  # wait until the first bytes of shard1 are on disk
            time.sleep(0.05)
            part = [tmp_path / 'cache' / f for f in os.listdir(tmp_path / 'cache')
                    if f.endswith('shard1.jsonl.gz.part') and os.path.getsize(tmp_path / 'cache' / f)]
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the run and its tokenizer processes, mid-download
        p.wait()
    server.hang.clear()
    server.release.set()
    state = json.loads((tmp_path / 'out' / prepare.STATE).read_text())
    assert state['sources_done'] == 1 and not (tmp_path / 'out' / 'meta.json').exists() and part
    have = os.path.getsize(part[0])

    out = run(tmp_path, server, '--num_proc=2')
    assert file_bytes(out) == reference
    assert server.requests['/shard0.jsonl.gz'] == 1  # downloaded by the killed run only
    assert server.requests['/shard1.jsonl.gz'] == 2  # and the second request continued where the first stopped:
    assert server.ranges == [('/shard1.jsonl.gz', f'bytes={have}-')]


def test_crash_mid_shard_and_at_the_end_resume_exactly(tmp_path, server, monkeypatch, capsys):
    reference = file_bytes(run(tmp_path, server, out='ref', cache='ref_cache'))
    server.reset()
    monkeypatch.setattr(prepare, 'BATCH_BYTES', 1)  # one document per batch, so output is written as it reads
    real_read = prepare.read_records

    def crashing_read(path):
        for i, record in enumerate(real_read(path)):
            if path.endswith('shard2.jsonl.gz') and i == 20:
                raise RuntimeError('crash (simulated)')
            yield record
    monkeypatch.setattr(prepare, 'read_records', crashing_read)
    with pytest.raises(RuntimeError, match='simulated'):
        run(tmp_path, server, '--keep_downloads=True')
    out = tmp_path / 'out'
    state = json.loads((out / prepare.STATE).read_text())
    assert state['sources_done'] == 2
    on_disk = sum(os.path.getsize(out / f) for f in os.listdir(out) if prepare.OUTPUT_FILE.fullmatch(f)) // 2
    assert on_disk > state['written']['val'] + state['written']['train']  # written after the last checkpoint

    monkeypatch.setattr(prepare, 'read_records', real_read)
    real_write = prepare.write_atomic

    def crashing_write(path, text):
        if path.endswith('meta.json'):
            raise RuntimeError('crash writing meta.json (simulated)')
        real_write(path, text)
    monkeypatch.setattr(prepare, 'write_atomic', crashing_write)
    with pytest.raises(RuntimeError, match='simulated'):  # every shard renamed to its final name, then a crash
        run(tmp_path, server, '--keep_downloads=True')
    assert 'resuming: 2 of 3 source shards were done' in capsys.readouterr().out
    monkeypatch.setattr(prepare, 'write_atomic', real_write)
    assert file_bytes(run(tmp_path, server, '--keep_downloads=True')) == reference
    assert server.requests == {'/list.txt': 1, '/shard0.jsonl.gz': 1, '/shard1.jsonl.gz': 1, '/shard2.jsonl.gz': 1}

    (out / prepare.STATE).write_text('{}')  # an unfinished run with other settings is started over
    (out / 'meta.json').unlink()
    run(tmp_path, server, '--shard_tokens=700', '--keep_downloads=True')
    meta = json.loads((out / 'meta.json').read_text())
    assert [s['tokens'] for s in meta['train_shards']][:-1] == [700] * (len(meta['train_shards']) - 1)
    assert sorted(os.listdir(out)) == sorted(['meta.json', 'val.bin'] + [s['file'] for s in meta['train_shards']])

# ----------------------------------------------------------------------------------------------------------
# broken downloads and damaged shards: a clear error or a retry, never a short shard


def test_connection_broken_mid_file_is_resumed(tmp_path, server):
    reference = file_bytes(run(tmp_path, server, out='ref', cache='ref_cache'))
    server.reset()
    server.short['/shard1.jsonl.gz'] = 'once'
    assert file_bytes(run(tmp_path, server)) == reference
    assert server.requests['/shard1.jsonl.gz'] == 2 and server.ranges[0][0] == '/shard1.jsonl.gz'


def test_partial_download_complete_or_not_continued(tmp_path, server):
    reference = file_bytes(run(tmp_path, server, '--keep_downloads=True', out='ref'))
    cache = tmp_path / 'cache'
    shard1 = cache / next(f for f in os.listdir(cache) if f.endswith('shard1.jsonl.gz'))
    part = shard1.with_name(shard1.name + '.part')
    size = shard1.stat().st_size
    shard1.rename(part)  # complete, but killed before the rename: the server answers 416, nothing is sent again
    server.reset()
    assert file_bytes(run(tmp_path, server, '--keep_downloads=True', out='a')) == reference
    assert server.ranges == [('/shard1.jsonl.gz', f'bytes={size}-')] and shard1.stat().st_size == size
    shard1.rename(part)
    os.truncate(part, size // 3)
    server.ignore_range = True  # a server without Range support sends it all, and the download starts over
    assert file_bytes(run(tmp_path, server, out='b')) == reference


def test_always_short_download_is_an_error(tmp_path, server):
    server.short['/shard1.jsonl.gz'] = 'always'
    url = f'{server.base}/shard1.jsonl.gz'
    with pytest.raises(UserError, match=re.escape(f'could not download {url} (the connection broke off')) as e:
        run(tmp_path, server)
    assert '\n' not in str(e.value) and server.requests['/shard1.jsonl.gz'] == 1 + prepare.DOWNLOAD_RETRIES
    assert not (tmp_path / 'out' / 'meta.json').exists()
    assert not [f for f in os.listdir(tmp_path / 'cache') if f.endswith('shard1.jsonl.gz')]  # only the .part


def test_http_404_names_the_url(tmp_path, server):
    (tmp_path / 'www' / 'list.txt').write_text('shard0.jsonl.gz\nmissing.jsonl.gz\n')
    url = f'{server.base}/missing.jsonl.gz'
    with pytest.raises(UserError, match=re.escape(f'could not download {url} (HTTP 404)')) as e:
        run(tmp_path, server)
    assert '\n' not in str(e.value) and server.requests['/missing.jsonl.gz'] == 1  # a 404 is not retried
    with pytest.raises(UserError, match=re.escape(f'could not download the list of shards {server.base}/nope.txt')):
        run(tmp_path, server, input='nope.txt', out='out2')


def test_truncated_gzip_is_an_error_then_downloaded_again(tmp_path, server):
    reference = file_bytes(run(tmp_path, server, out='ref', cache='ref_cache'))
    shard = tmp_path / 'www' / 'shard1.jsonl.gz'
    good = shard.read_bytes()
    shard.write_bytes(good[:len(good) * 2 // 3])  # served whole, but the gzip stream stops short
    with pytest.raises(UserError, match='shard1.jsonl.gz is damaged .*run the same command again') as e:
        run(tmp_path, server)
    assert '\n' not in str(e.value) and not [f for f in os.listdir(tmp_path / 'cache') if 'shard1' in f]
    shard.write_bytes(good)
    assert file_bytes(run(tmp_path, server)) == reference

# ----------------------------------------------------------------------------------------------------------
# the source lists and their errors


def cfg(**kw):
    return prepare.PrepareConfig(cache_dir='/nonexistent', **kw)


def test_c4_and_fineweb_edu_shard_lists():
    sources, source = prepare.stream_sources(cfg(dataset='c4'))
    assert len(sources) == 1024 and sources[0] == \
        'https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz'
    assert sources[-1].endswith('/en/c4-train.01023-of-01024.json.gz') and '{:05d}' in source
    sources, _ = prepare.stream_sources(cfg(dataset='fineweb_edu'))
    assert len(sources) == 14 and sources[13].endswith('/fineweb-edu/resolve/main/sample/10BT/013_00000.parquet')


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'pyarrow', None)  # import pyarrow now fails, as when it is not installed
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    with pytest.raises(UserError, match=r'parquet files, which need pyarrow: `pip install pyarrow`'):
        prepare.main(['--dataset=fineweb_edu', f'--out_dir={tmp_path}/out', '--cache_dir=/nonexistent'])
    assert not (tmp_path / 'out').exists()  # before any download


def test_parquet_shards(tmp_path, server):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    texts = documents(5, 40) + ['tiny', None]
    pq.write_table(pa.table({'text': texts, 'id': list(range(len(texts)))}), tmp_path / 'www' / 'part.parquet',
                   row_group_size=16)
    meta, val, train = read_output(run(tmp_path, server, input='part.parquet'))
    assert meta['documents'] == {'seen': 42, 'kept': 40, 'duplicates': 0, 'too_short': 1, 'bad': 1}
    assert decode(val) + EOT + decode(train) == EOT.join(texts[:40])


@pytest.mark.parametrize('args, message', [
    (['--dataset=urls'], '--dataset=urls needs --input'),
    (['--dataset=urls', '--input={}/nope.txt'], "input '{}/nope.txt' not found"),
    (['--dataset=urls', '--input={}/a.jsonl,{}/gone.jsonl.gz'], "source shard '{}/gone.jsonl.gz' not found"),
    (['--dataset=urls', '--input={}/a.jsonl,{}/x.csv'], "'{}/x.csv' is not a .jsonl"),
    (['--dataset=urls', '--input={}/prose.txt'], r"line 1 of '{}/prose.txt' \('Once upon a time'\) is not a shard"),
    (['--dataset=c4', '--tokenizer=char'], 'need a fixed vocabulary'),
    (['--dataset=c4', '--max_tokens=1e5', '--val_tokens=1e6'], r'max_tokens \(100,000\) must be more than'),
    (['--dataset=c4', '--shard_tokens=0.5'], 'shard_tokens must be a whole number of tokens'),
])
def test_stream_errors(tmp_path, args, message):
    (tmp_path / 'a.jsonl').write_text('{"text": "some document"}\n')
    (tmp_path / 'prose.txt').write_text('Once upon a time\nthere was a list that was not a list.\n')
    args = [a.replace('{}', str(tmp_path)) for a in args]
    with pytest.raises(UserError, match=message.replace('{}', re.escape(str(tmp_path)))):
        prepare.main(args + [f'--out_dir={tmp_path}/out', '--cache_dir=/nonexistent'])

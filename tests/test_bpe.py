"""Tests for bpe.py: training against the recount-per-merge reference (train_ranks_naive), round trips,
tiktoken parity, errors.

    python -m pytest tests/test_bpe.py -q
"""
import doctest
import json
import os
import random
import subprocess
import sys

import pytest
import tiktoken

import bpe
from bpe import BPEError, Tokenizer
from conftest import SHARED, shared_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHOLE = r'(?s).+'  # a split pattern that does not split: plain byte-level BPE, as in the textbook
TRICKY = [
    '', ' ', 'hello world', "I'll've they'RE 123456789 1,000.5",
    '   leading and trailing   ', '\t\t tabs\t', 'a\n\n\nb\n', 'crlf\r\nline\r\n\r\n', '\r\r\n \n \r',
    'ünïcödé naïve café', '日本語のテキスト', 'Ελληνικά и русский', 'emoji 👍🏽 👨‍👩‍👧‍👦 🇳🇱 🏳️‍🌈 ❤️',
    'math 𝔸𝕓𝕔 ∑∫√ ≠', 'zero\u200bwidth\ufeffbom', '\x00\x01\x7f control', '<|endoftext|> as text',
]


def every_plane_text(n=40, seed=0):
    """Random characters from each of the 17 Unicode planes (surrogates left out: they are not text)."""
    rng = random.Random(seed)
    chars = []
    for plane in range(17):
        while len(chars) < n * (plane + 1):
            c = rng.randrange(plane << 16, (plane + 1) << 16)
            if not 0xD800 <= c < 0xE000:
                chars.append(chr(c))
    return ''.join(chars)


def read(*parts):
    with open(shared_file(*parts), encoding='utf-8', newline='') as f:
        return f.read()


@pytest.fixture(scope='module')
def shakespeare():
    return read('tinyshakespeare.txt')


@pytest.fixture(scope='module')
def tok(shakespeare):
    """1k tokens trained on Tiny Shakespeare, with a chat marker besides <|endoftext|>."""
    return bpe.train(shakespeare, 1000, special_tokens=['<|endoftext|>', '<|im_start|>'], progress=False)


@pytest.fixture(scope='module')
def real_text(shakespeare):
    """A few KB each of Shakespeare, a PEP and Wikipedia."""
    pep, wiki = read('docs', 'peps', 'pep-0008.rst'), read('wikitext2', 'wiki.valid.tokens')
    return shakespeare[:20_000] + pep[:20_000] + wiki[:20_000]


@pytest.fixture(scope='module')
def tiktoken_offline():
    old = os.environ.get('TIKTOKEN_CACHE_DIR')
    os.environ['TIKTOKEN_CACHE_DIR'] = shared_file('tiktoken_cache')
    yield
    if old is None:
        del os.environ['TIKTOKEN_CACHE_DIR']
    else:
        os.environ['TIKTOKEN_CACHE_DIR'] = old


def test_docstring_examples():
    assert doctest.testmod(bpe).failed == 0

# ----------------------------------------------------------------------------------------------------------
# training


def test_textbook_example():
    # aaabdaaabac: aa -> Z (4 times), then ab -> Y (twice, tied with Z a: (97, 98) < (256, 97)), then ZY -> X
    tok = bpe.train('aaabdaaabac', 259, pattern=WHOLE, special_tokens=(), progress=False)
    assert [tok.vocab[i] for i in range(256, 259)] == [b'aa', b'ab', b'aaab']
    assert tok.encode('aaabdaaabac') == [258, ord('d'), 258, ord('a'), ord('c')]  # XdXac
    assert tok.vocab_size == 259 and tok.eot_token is None and tok.special_tokens == {}


@pytest.mark.parametrize('pattern', ['gpt2', 'gpt4', WHOLE])
def test_incremental_training_equals_recounting(shakespeare, pattern):
    text = shakespeare[:2000 if pattern == WHOLE else 30_000] + ' aaaa aaaaaaa ababab bbbbb' * 50  # runs where
    # the merged pair overlaps itself
    counts = {c.encode(): n for c, n in bpe.count_chunks([[text]], pattern).items()}
    assert bpe.train_ranks(counts, 700) == bpe.train_ranks_naive(counts, 700)


def tie_text():
    """Unicode, digits, whitespace runs, lone surrogates, and ties: pairs met in the opposite order to their ids."""
    ties = 'zy xw vu zy xw vu ' * 7 + 'qqqq pppp ' * 5 + 'ba ab ' * 6  # many pairs share a count
    spaces = ' \t \n\n\n   \r\n  ' * 5
    return ties + ' '.join(TRICKY) * 3 + '123 4567 89012345 3.14159 ' * 4 + spaces + 'x\ud800 x\udfff' * 4


@pytest.mark.parametrize('which', ['shakespeare', 'tricky'])
def test_naive_trainer_gives_the_same_merges(shakespeare, which):
    text = shakespeare[:20_000] if which == 'shakespeare' else tie_text()
    naive = bpe.train_ranks_naive(text, 400)
    fast = bpe.train(text, 400, special_tokens=(), progress=False).ranks
    assert sorted(naive, key=naive.get) == sorted(fast, key=fast.get)  # the same merges, in the same order
    assert naive == fast and len(fast) == 400
    if which == 'tricky':  # the first merges are ties: the smallest (left, right) wins, not the pair met first
        counts = {}
        for chunk, n in bpe.count_chunks([[text]], 'gpt4').items():
            bpe.count_pairs(list(chunk.encode('utf-8', 'replace')), counts, n)
        assert counts[ord('q'), ord('q')] == counts[ord('p'), ord('p')] == 15  # qq is met first, pp wins
        merges = sorted(fast, key=fast.get)[256:]
        assert merges.index(b'pp') < merges.index(b'qq') and merges.index(b' xw') < merges.index(b' zy')
        assert bpe.train_ranks_naive(text, 400, min_frequency=3) == bpe.train(
            text, 400, special_tokens=(), min_frequency=3, progress=False).ranks


def test_training_is_deterministic_and_independent_of_input_order(shakespeare):
    docs = [shakespeare[i:i + 50_000] for i in range(0, 400_000, 50_000)]
    one = bpe.train(docs[0] + docs[1], 600, progress=False)
    assert one.ranks == bpe.train(docs[0] + docs[1], 600, progress=False).ranks
    counts = [bpe.count_chunks([[d] for d in order], 'gpt4') for order in (docs, docs[::-1])]
    ranks = [bpe.train_ranks({c.encode(): n for c, n in cc.items()}, 800) for cc in counts]
    assert ranks[0] == ranks[1]


def test_special_tokens_take_the_last_ids_and_are_never_merged(tok):
    assert tok.vocab_size == 1000 and tok.special_tokens == {'<|endoftext|>': 998, '<|im_start|>': 999}
    assert tok.eot_token == 998
    many = bpe.train('ab<|endoftext|>' * 100, 300, pattern=WHOLE, progress=False)
    assert len(many.ranks) == 257  # only ab: the special text was cut out before counting
    assert many.encode('ab<|endoftext|>ab', allowed_special='all') == [256, 257, 256]


def test_min_frequency_and_running_out_of_pairs():
    tok = bpe.train('abab abab cdcd', 1000, min_frequency=2, special_tokens=(), progress=False)
    # ab (4 times), then cd (tied with ab ab at 2: (99, 100) < (256, 256)), then abab; ' abab' occurs once
    assert sorted(tok.ranks, key=tok.ranks.get)[256:] == [b'ab', b'cd', b'abab']
    tok = bpe.train('hello', 1000, progress=False)  # only 4 merges exist: a smaller vocabulary, no error
    assert tok.vocab_size == 261 and tok.eot_token == 260 and tok.encode('hello') == [259]


def test_inputs_files_folders_jsonl_and_block_boundaries(tmp_path, shakespeare):
    (tmp_path / 'corpus' / 'sub').mkdir(parents=True)
    (tmp_path / 'corpus' / 'a.txt').write_text(shakespeare[:40_000])
    (tmp_path / 'corpus' / '.hidden').write_bytes(b'\0 skipped')
    records = [{'text': shakespeare[i:i + 1000], 'id': i} for i in range(40_000, 80_000, 1000)]
    (tmp_path / 'corpus' / 'sub' / 'b.jsonl').write_text('\n'.join(map(json.dumps, records)) + '\n\n')
    from_files = bpe.train([tmp_path / 'corpus'], 500, progress=False)
    texts = [[shakespeare[:40_000]]] + [[r['text']] for r in records]
    counts = bpe.count_chunks(texts, 'gpt4', ['<|endoftext|>'])
    assert from_files.ranks == bpe.train_ranks({c.encode(): n for c, n in counts.items()}, 499)
    # reading in tiny blocks cuts words, numbers and CRLFs apart: the carried chunks put them back together
    crlf = tmp_path / 'crlf.txt'
    crlf.write_bytes(("I'll say 12345 naïve 👍🏽\r\n\r\n  x'll \n" * 30).encode() + shakespeare[:5000].encode())
    for pattern in ('gpt2', 'gpt4'):
        whole = bpe.count_chunks([[crlf.read_bytes().decode()]], pattern)
        for size in (1, 2, 3, 7):
            assert bpe.count_chunks([bpe.read_blocks(str(crlf), size)], pattern) == whole

# ----------------------------------------------------------------------------------------------------------
# encoding and decoding


def test_round_trips(tok):
    rng = random.Random(0)
    random_bytes = [bytes(rng.randrange(256) for _ in range(200)) for _ in range(20)]
    texts = TRICKY + [every_plane_text()] + [b.decode('utf-8', 'replace') for b in random_bytes] + [
        bytes(range(256)).decode('latin-1'), ' ' * 1000 + '\n' * 100 + '\r\n' * 50]
    enc = tok.to_tiktoken()
    for text in texts:
        ids = tok.encode(text, disallowed_special=())
        assert tok.decode(ids) == text
        assert ids == enc.encode(text, disallowed_special=())
    # every byte is a token, so arbitrary bytes (not UTF-8 at all) come back exactly from decode_bytes
    for b in random_bytes:
        assert tok.decode_bytes([tok.ranks[bytes([x])] for x in b]) == b
    text = 'a<|endoftext|>b<|im_start|>c'
    ids = tok.encode(text, allowed_special='all')
    assert ids.count(998) == 1 and ids.count(999) == 1 and tok.decode(ids) == text


def test_decoding_invalid_utf8_replaces(tok):
    half = tok.encode('é')[:1]  # the first byte of a two-byte character
    assert tok.decode_bytes(half) == 'é'.encode()[:1]
    assert tok.decode(half + tok.encode('ok')) == '\ufffdok'
    assert tok.decode([tok.ranks[b'\xff'], tok.ranks[b'\xfe']]) == '\ufffd\ufffd'
    with pytest.raises(BPEError, match='token id 5000 is not in the vocabulary'):
        tok.decode([5000])


def test_lone_surrogates_are_replaced_like_tiktoken(tok):
    text = 'a\ud800b\udfff'
    assert tok.encode(text) == tok.to_tiktoken().encode(text)
    assert tok.decode(tok.encode(text)) == 'a\ufffdb\ufffd'


def test_our_encoder_equals_the_tiktoken_export_on_real_text(tok, shakespeare, real_text):
    enc = tok.to_tiktoken()
    assert enc._pat_str == tok.pattern == bpe.GPT4_SPLIT_PATTERN  # trained and exported with one pattern string
    for text in (shakespeare, real_text):
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    gpt2_style = bpe.train(real_text, 2000, pattern='gpt2', progress=False)
    assert gpt2_style.encode_ordinary(real_text) == gpt2_style.to_tiktoken().encode_ordinary(real_text)


@pytest.mark.parametrize('allowed,disallowed', [
    (set(), 'all'), ('all', 'all'), ({'<|endoftext|>'}, 'all'), ({'<|endoftext|>'}, ()), (set(), ()),
    ({'<|im_start|>'}, {'<|endoftext|>'}), (set(), {'<|im_start|>'}), ({'<|endoftext|>', 'not special'}, ())])
def test_allowed_special_like_tiktoken(tok, allowed, disallowed):
    enc = tok.to_tiktoken()
    for text in ['plain', 'x<|endoftext|>y', '<|im_start|>user<|endoftext|>', '<|endoftext|><|endoftext|>']:
        try:
            want = enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        except ValueError:
            with pytest.raises(BPEError, match='contains the special token'):
                tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        else:
            assert tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == want


def test_special_text_raises_by_default(tok):
    with pytest.raises(BPEError) as e:
        tok.encode('hi <|endoftext|>')
    assert "'<|endoftext|>'" in str(e.value) and 'allowed_special' in str(e.value) and '\n' not in str(e.value)
    assert tok.encode('<|endoftext|>', disallowed_special=()) == tok.encode_ordinary('<|endoftext|>')
    assert len(tok.encode('<|endoftext|>', disallowed_special=())) > 1

# ----------------------------------------------------------------------------------------------------------
# GPT-2 and GPT-4 (cl100k_base) from tiktoken's own files


@pytest.mark.parametrize('name', ['gpt2', 'cl100k_base'])
def test_reproduces_tiktoken_exactly(tiktoken_offline, name, real_text):
    ref = tiktoken.get_encoding(name)
    tok = Tokenizer.from_tiktoken(name)
    pep = read('docs', 'peps', 'pep-0020.rst')
    for text in [real_text, pep, every_plane_text()] + TRICKY:
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text)
    text = 'Hi<|endoftext|>there'
    assert tok.encode(text, allowed_special='all') == ref.encode(text, allowed_special='all')
    assert tok.decode(ref.encode(real_text)) == real_text
    assert (tok.vocab_size, tok.eot_token) == {'gpt2': (50257, 50256), 'cl100k_base': (100277, 100257)}[name]
    assert Tokenizer.from_tiktoken(ref).ranks == tok.ranks
    assert tok.pattern == ref._pat_str == {'gpt2': bpe.GPT2_SPLIT_PATTERN, 'cl100k_base': bpe.GPT4_SPLIT_PATTERN}[name]
    assert tok.encode('hello world') == {'gpt2': [31373, 995], 'cl100k_base': [15339, 1917]}[name]


def test_unknown_tiktoken_encoding(tiktoken_offline):
    with pytest.raises(BPEError, match="could not load tiktoken's 'gpt5'.*known: .*cl100k_base"):
        Tokenizer.from_tiktoken('gpt5')

# ----------------------------------------------------------------------------------------------------------
# files


def test_save_load_and_tiktoken_file(tok, tmp_path, real_text):
    path = tmp_path / 'tok.model'
    tok.save(path)
    lines = open(path, encoding='utf-8').read().splitlines()
    assert lines[0] == 'bpe.py tokenizer v1' and lines[2].startswith('pattern "')
    assert 'special 998 "<|endoftext|>"' in lines and '32 " "' in lines and '255 [255]' in lines
    back = Tokenizer.load(str(path))
    fields = lambda t: (t.ranks, t.pattern, t.special_tokens, t.name, t.vocab_size, t.eot_token)
    assert fields(back) == fields(tok)
    assert back.encode(real_text) == tok.encode(real_text)
    ranks_file = str(tmp_path / 'tok.tiktoken')
    tok.save_tiktoken(ranks_file)
    from tiktoken.load import load_tiktoken_bpe
    assert load_tiktoken_bpe(ranks_file) == tok.ranks


def test_save_load_every_byte_sequence(tmp_path, tiktoken_offline):
    gpt2 = Tokenizer.from_tiktoken('gpt2')  # byte tokens out of order, tokens that are not UTF-8
    path = str(tmp_path / 'gpt2.model')
    gpt2.save(path)
    assert Tokenizer.load(path).ranks == gpt2.ranks


def test_load_errors(tmp_path):
    with pytest.raises(BPEError, match='not found'):
        Tokenizer.load(str(tmp_path / 'nope.model'))
    (tmp_path / 'x.model').write_text('hello\n')
    with pytest.raises(BPEError, match='is not a bpe.py tokenizer file'):
        Tokenizer.load(str(tmp_path / 'x.model'))
    (tmp_path / 'y.model').write_text('bpe.py tokenizer v1\npattern "x"\n0 "\\u0000\n')
    with pytest.raises(BPEError, match=r'y.model:3 is damaged'):
        Tokenizer.load(str(tmp_path / 'y.model'))

# ----------------------------------------------------------------------------------------------------------
# errors a user can hit, each one line


def one_line(excinfo):
    message = str(excinfo.value)
    assert '\n' not in message and len(message) < 300, message
    return message


def test_training_errors(tmp_path):
    with pytest.raises(BPEError, match='vocab_size=256 is too small.*at least 257') as e:
        bpe.train('hello', 256, progress=False)
    one_line(e)
    with pytest.raises(BPEError, match='at least 258'):
        bpe.train('hello', 257, special_tokens=['<|a|>', '<|b|>'], progress=False)
    assert bpe.train('hello', 257, progress=False).vocab_size == 257  # bytes and <|endoftext|>, no merges
    with pytest.raises(BPEError, match='distinct non-empty'):
        bpe.train('hello', 300, special_tokens=['<|a|>', '<|a|>'], progress=False)
    with pytest.raises(BPEError, match='no text to train on'):
        bpe.train('', 300, progress=False)
    (tmp_path / 'empty.txt').write_text('')
    with pytest.raises(BPEError, match='no text to train on'):
        bpe.train([tmp_path / 'empty.txt'], 300, progress=False)
    with pytest.raises(BPEError, match='missing.txt not found') as e:
        bpe.train([tmp_path / 'missing.txt'], 300, progress=False)
    one_line(e)
    (tmp_path / 'model.bin').write_bytes(b'PK\x03\x04\x00\x00binary')
    with pytest.raises(BPEError, match=r'model.bin looks binary \(a NUL byte at offset 4\)') as e:
        bpe.train([tmp_path], 300, progress=False)
    one_line(e)
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
    with pytest.raises(BPEError, match=r'latin1.txt is not UTF-8 text \(byte 0xe9 near offset 3\)'):
        bpe.train([tmp_path / 'latin1.txt'], 300, progress=False)
    (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(BPEError, match=r"bad.jsonl:2 has no 'text' string to train on \(found: body\)"):
        bpe.train([tmp_path / 'bad.jsonl'], 300, progress=False)
    (tmp_path / 'empty_dir').mkdir()
    with pytest.raises(BPEError, match='has no files'):
        bpe.train([tmp_path / 'empty_dir'], 300, progress=False)
    with pytest.raises(BPEError, match='not a valid regex'):
        bpe.train('hello', 300, pattern='(unclosed', progress=False)
    with pytest.raises(BPEError, match='names a file.*pass \\[path\\]'):
        bpe.train(str(tmp_path / 'latin1.txt'), 300, progress=False)

# ----------------------------------------------------------------------------------------------------------
# command line


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, 'bpe.py'), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, 'TIKTOKEN_CACHE_DIR': os.path.join(SHARED, 'tiktoken_cache')})


def test_cli_train_encode_decode(tmp_path, shakespeare):
    (tmp_path / 'in.txt').write_text(shakespeare[:50_000])
    p = cli(f'--input={tmp_path / "in.txt"}', '--vocab_size=400', f'--out={tmp_path / "t.model"}',
            '--special_tokens=<|endoftext|>,<|im_end|>', '--chat_tokens=False',
            f'--tiktoken_out={tmp_path / "t.tiktoken"}', '--encode=To be')
    assert p.returncode == 0, p.stderr
    assert 'wrote' in p.stdout and os.path.exists(tmp_path / 't.tiktoken')
    tok = Tokenizer.load(str(tmp_path / 't.model'))
    assert tok.vocab_size == 400 and tok.special_tokens == {'<|endoftext|>': 398, '<|im_end|>': 399}
    assert str(tok.encode('To be')) in p.stdout
    half_char = tok.ranks['é'.encode()[:1]]
    p = cli(f'--model={tmp_path / "t.model"}', '--encode=hi<|im_end|>', f'--decode=104,105,399,{half_char}')
    assert p.returncode == 0, p.stderr
    assert '399]' in p.stdout and 'hi<|im_end|>\ufffd' in p.stdout


def test_cli_errors(tmp_path):
    for args, message in [
            (['--vocab=300'], 'unknown option --vocab; did you mean --vocab_size?'),
            (['--input=x.txt', '--vocab_size=lots'], "--vocab_size must be an integer, got 'lots'"),
            (['--input=x.txt', '--vocab_size=300', '--chat_tokens=no'], "--chat_tokens must be True or False"),
            (['--input=missing.txt', '--vocab_size=300'], 'missing.txt not found'),
            (['--input=x.txt'], 'training needs --vocab_size'),
            (['vocab_size=300'], "must look like --key=value"),
            (['--model=nope.model', '--encode=x'], 'tokenizer file nope.model not found'),
            (['--model=gpt2', '--decode=1,x'], '--decode takes ids')]:
        p = cli(*args, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.startswith('error: ') and message in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr

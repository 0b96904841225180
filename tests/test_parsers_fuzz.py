"""Strict parsers: a malformed safetensors file (or shard index), bpe.py model file, tokenizer.json, GGUF file or
GGUF tokenizer metadata is refused with one line that names the file and what is wrong (PretrainedError,
BPEError, GGUFError), never another exception, a hang, or a tensor that reaches past its bytes. First each
reproduced defect, then seeded fuzzing (truncations, byte flips, line shuffles, JSON nodes swapped for odd
values), each run bounded by a case count and by FUZZ_SECONDS; a failure names its seed and case number.

    python -m pytest tests/test_parsers_fuzz.py -q
"""
import contextlib
import copy
import json
import os
import random
import signal
import struct
import time

import numpy as np
import pytest
import torch

import bpe
import weights
from bpe import BPEError
from weights import GGUFError
from weights import PretrainedError, load_pretrained_state, load_safetensors, save_safetensors

# per fuzz test, whichever comes first; FUZZ_SCALE=20 FUZZ_SEED=1 (say) searches longer, and elsewhere
SCALE, SEED = float(os.environ.get('FUZZ_SCALE', 1)), int(os.environ.get('FUZZ_SEED', 0))
FUZZ_CASES, FUZZ_SECONDS = int(1000 * SCALE), 3.0 * SCALE
HANG_SECONDS = 10  # one case running this long is a hang
TEXT = "Hello world, it's 1234 o'clock!\n\tTabs, ünïcödé, 日本語 <|endoftext|> and emoji 👍🏽."
ODD = [None, True, False, 0, -1, 1.5, float('nan'), 2 ** 31, 2 ** 64, 10 ** 20, '', 'x', '\u2581', '<0x41>', [],
       {}, [1, 'a'], ['a', 'b'], [[1]], {'a': None}, {'type': 'Split'}]  # what a damaged node may hold instead


def one_line(e, name):
    """The message of e: one line that names the file (or source) it is about."""
    message = str(e)
    assert '\n' not in message and name in message and len(message) < 600, message
    return message


@contextlib.contextmanager
def no_hang(what):
    """Fails the test, naming what, if the block runs past HANG_SECONDS (on systems that have SIGALRM)."""
    def hang(*_):
        raise AssertionError(f"{what} hangs (over {HANG_SECONDS} s)")
    old = signal.signal(signal.SIGALRM, hang) if hasattr(signal, 'SIGALRM') else None
    if old is not None:
        signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def fuzz(cases, check, seed, n=FUZZ_CASES, seconds=FUZZ_SECONDS):
    """check(case) for the cases that cases(rng) yields, up to n of them or for seconds; how many ran (under 50
    fails: a machine that slow would test next to nothing)."""
    seed += SEED * 1000
    rng, deadline, done = random.Random(seed), time.monotonic() + seconds, 0
    for case in cases(rng):
        if done >= n or time.monotonic() > deadline:
            break
        with no_hang(f"seed {seed} case {done}"):
            try:
                check(case)
            except AssertionError as e:
                raise AssertionError(f"seed {seed} case {done}: {e}") from None
        done += 1
    assert done >= 50, f"only {done} fuzz cases in {seconds} s"
    return done


def damaged(data, rng, flips_within=None, alphabet=None):
    """Copies of data: first truncated at lengths spread over it, then with 1 to 8 bytes replaced (at random, or
    from alphabet: characters that make a parser look further than random bytes do), half within the first
    flips_within bytes."""
    for cut in sorted({int(len(data) * (i / 60) ** 2) for i in range(60)} | {1, 7, 8, 9, len(data) - 1}):
        yield data[:cut]
    while True:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(flips_within if flips_within and rng.random() < 0.5 else len(out))
            out[at] = rng.choice(alphabet) if alphabet and rng.random() < 0.7 else rng.randrange(256)
        yield bytes(out)


def mutated(tree, rng):
    """A copy of a JSON tree with one node (found by a random walk from the root, so shallow nodes are hit often)
    replaced by an odd value, or deleted."""
    tree = copy.deepcopy(tree)
    node = tree
    while True:
        key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
        if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.7:
            node = node[key]
            continue
        if rng.random() < 0.15:
            del node[key]
        else:
            node[key] = copy.deepcopy(rng.choice(ODD))
        return tree


def write_new(path, raw):
    """raw as the file path, a new file each time: a mapping of the old one (read_gguf, load_safetensors keep
    theirs) must never see its file change under it."""
    with open(path + '.new', 'wb') as f:
        f.write(raw)
    os.replace(path + '.new', path)
    return path

# ----------------------------------------------------------------------------------------------------------
# safetensors


def st_file(header, data=b'', length=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack('<Q', len(raw) if length is None else length) + raw + data


F32 = lambda shape, begin, end: {'dtype': 'F32', 'shape': shape, 'data_offsets': [begin, end]}  # noqa: E731
NEST = '[' * 100_000 + ']' * 100_000
ST_CASES = {  # name: (file bytes, the message's regex)
    'header a list': (st_file([1, 2]), r'corrupt safetensors header \(not a JSON object\)'),
    'header a string': (st_file('x'), 'not a JSON object'),
    'deeply nested': (st_file(f'{{"a": {NEST}}}'.encode()), r'corrupt safetensors header \(not JSON\)'),
    'not UTF-8': (st_file(b'{"\xff": 1}'), r'\(not JSON\)'),
    'shape of strings': (st_file({'a': F32(['4'], 0, 16)}, bytes(16)), 'tensor a has an unknown dtype or a corrupt'),
    'shape of floats': (st_file({'a': F32([4.0], 0, 16)}, bytes(16)), 'corrupt entry'),
    'negative shape': (st_file({'a': F32([-4], 0, 16)}, bytes(16)), 'corrupt entry'),
    'shape of bools': (st_file({'a': F32([True, True], 0, 4)}, bytes(4)), 'corrupt entry'),
    'shape not a list': (st_file({'a': F32(4, 0, 16)}, bytes(16)), 'corrupt entry'),
    '[-1] with offsets run backwards': (st_file({'a': F32([-1], 16, 12)}, bytes(64)), 'corrupt entry'),
    'offsets run backwards': (st_file({'a': F32([0], 16, 0)}, bytes(64)), 'corrupt entry'),
    'offsets negative': (st_file({'a': F32([4], -16, 0)}, bytes(64)), 'corrupt entry'),
    'offsets of bools': (st_file({'a': F32([], False, True)}, bytes(64)), 'corrupt entry'),
    'three offsets': (st_file({'a': {**F32([4], 0, 16), 'data_offsets': [0, 8, 16]}}, bytes(16)), 'corrupt entry'),
    'offsets of strings': (st_file({'a': {**F32([4], 0, 16), 'data_offsets': ['0', '16']}}, bytes(16)),
                           'corrupt entry'),
    'unknown dtype': (st_file({'a': {**F32([4], 0, 16), 'dtype': 'F99'}}, bytes(16)), "corrupt entry: .*'F99'"),
    'dtype a list': (st_file({'a': {**F32([4], 0, 16), 'dtype': ['F32']}}, bytes(16)), 'corrupt entry'),
    'entry a list': (st_file({'a': [1, 2]}, bytes(16)), 'corrupt entry'),
    'entry lacks a key': (st_file({'a': {'dtype': 'F32', 'shape': [4]}}, bytes(16)), 'corrupt entry'),
    'entry has an extra key': (st_file({'a': {**F32([4], 0, 16), 'x': 1}}, bytes(16)), 'corrupt entry'),
    'size does not match': (st_file({'a': F32([5], 0, 16)}, bytes(16)), r'F32\[5\] needs 20 bytes but its '
                                                                         r'data_offsets span 16'),
    'impossible shape': (st_file({'a': F32([2 ** 62, 2 ** 62, 0], 0, 0)}, bytes(16)), 'impossible shape'),
    'dim past int64': (st_file({'a': F32([2 ** 63, 0], 0, 0)}, bytes(16)), 'corrupt entry'),
    'past the data': (st_file({'a': F32([8], 0, 32)}, bytes(16)), 'truncated: tensor a ends at byte'),
    'overlapping': (st_file({'a': F32([4], 0, 16), 'b': F32([2], 8, 16)}, bytes(16)), 'tensors a and b overlap'),
    'the same bytes twice': (st_file({'a': F32([4], 0, 16), 'b': F32([4], 0, 16)}, bytes(16)), 'overlap'),
    'a name twice': (st_file(b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {"dtype": "F32", '
                             b'"shape": [], "data_offsets": [4, 8]}}', bytes(8)), 'the name a appears twice'),
    'metadata a list': (st_file({'__metadata__': ['a']}), '__metadata__ is not an object of strings'),
    'metadata of numbers': (st_file({'__metadata__': {'step': 7}}), '__metadata__ is not an object of strings'),
    'a name with a newline': (st_file({'a\nb': F32([5], 0, 16)}, bytes(16)), r"tensor 'a\\nb' F32"),
    'header past the file': (st_file({}, length=10 ** 6), 'truncated or not safetensors: a 1000000-byte header'),
    'shorter than 8 bytes': (b'\x05\0\0', 'truncated or not safetensors'),
}


@pytest.mark.parametrize('case', ST_CASES)
def test_safetensors_damage_is_one_line(tmp_path, case):
    raw, message = ST_CASES[case]
    path = write_new(str(tmp_path / 'bad.safetensors'), raw)
    with pytest.raises(PretrainedError, match=message) as e:
        load_safetensors(path)
    one_line(e.value, path)


def test_safetensors_absurd_header_length_is_refused_unread(tmp_path):
    path = str(tmp_path / 'huge.safetensors')
    with open(path, 'wb') as f:  # a sparse 200 MB file: its header length says 150 MB
        f.write(struct.pack('<Q', 150 << 20) + b'{')
        f.truncate(200 << 20)
    with pytest.raises(PretrainedError, match='header length says 157286400 bytes, over 100 MB') as e:
        load_safetensors(path)
    one_line(e.value, path)


def test_safetensors_odd_but_valid_entries_load(tmp_path):
    """Empty tensors anywhere, null metadata (the reference reader takes it), a zero-sized dim beside a huge one."""
    header = {'__metadata__': None, 'a': F32([2], 0, 8), 'e': F32([0, 3], 8, 8), 'z': F32([2 ** 62, 0], 0, 0)}
    path = write_new(str(tmp_path / 'ok.safetensors'), st_file(header, struct.pack('<2f', 1.5, 2.5)))
    out = load_safetensors(path)
    assert out['a'].tolist() == [1.5, 2.5] and out['e'].shape == (0, 3) and out['z'].shape == (2 ** 62, 0)


def st_sample(tmp_path):
    path = str(tmp_path / 'sample.safetensors')
    g = torch.Generator().manual_seed(0)
    save_safetensors({'w': torch.randn(4, 4, generator=g), 'h': torch.randn(3, generator=g).half(),
                      'b': torch.randn(2, 2, generator=g).bfloat16(), 'i': torch.arange(3), 'e': torch.zeros(0, 2),
                      's': torch.tensor(7, dtype=torch.int8), 'm': torch.tensor([True, False])}, path,
                     metadata={'format': 'pt'})
    return open(path, 'rb').read()


def reference(raw):
    """{name: tensor} by the safetensors package (transformers brings it), or None: it refuses raw, or is missing."""
    try:
        from safetensors.torch import load
        return load(raw)
    except Exception:  # its errors have no common class
        return None


def raw_bytes(t):
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def st_check(path):
    """check(raw) for the fuzz: raw loads, each tensor exactly the bytes its entry names inside the data, or it is
    refused with one line that names the file; and what the reference reader loads, loads here alike."""
    def check(raw):
        write_new(path, raw)
        want = reference(raw)
        try:
            out = load_safetensors(path)
        except PretrainedError as e:
            one_line(e, path)
            # stricter than the package on purpose: of a name given twice it keeps one, hiding the other
            assert want is None or 'appears twice' in str(e), f"the safetensors package loads what is refused: {e}"
            return
        if want is not None:  # (bytes, not values: a flip can make a NaN, which equals nothing)
            assert want.keys() == out.keys() and all(want[k].dtype == out[k].dtype and want[k].shape == out[k].shape
                                                     and raw_bytes(want[k]) == raw_bytes(out[k]) for k in want)
        n = struct.unpack('<Q', raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        for name, t in out.items():
            begin, end = header[name]['data_offsets']
            assert 8 + n + end <= len(raw), name
            assert raw_bytes(t) == raw[8 + n + begin:8 + n + end], name
    return check


def test_safetensors_fuzz_truncations_and_byte_flips(tmp_path):
    data = st_sample(tmp_path)
    n = struct.unpack('<Q', data[:8])[0]
    fuzz(lambda rng: damaged(data, rng, flips_within=8 + n, alphabet=b'0123456789-[]{}",:. etrufnalF'),
         st_check(str(tmp_path / 'x.safetensors')), seed=1)


def test_safetensors_fuzz_header_values(tmp_path):
    data = st_sample(tmp_path)
    n = struct.unpack('<Q', data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    fuzz(lambda rng: (st_file(mutated(header, rng), body) for _ in iter(int, 1)),
         st_check(str(tmp_path / 'x.safetensors')), seed=2)


def shard_folder(tmp_path, index):
    folder = tmp_path / 'sharded'
    folder.mkdir(exist_ok=True)
    save_safetensors({'a': torch.ones(2)}, str(folder / 'one.safetensors'))
    save_safetensors({'b': torch.zeros(3)}, str(folder / 'two.safetensors'))
    (folder / 'model.safetensors.index.json').write_text(index if isinstance(index, str) else json.dumps(index))
    return str(folder)


@pytest.mark.parametrize('index,message', [
    ('{"weight_map": ', r'index.json: corrupt \(not a JSON object\)'),
    ('[1, 2]', r'corrupt \(not a JSON object\)'),
    ('{"a": ' * 100_000, r'corrupt \(not a JSON object\)'),
    ({}, 'its weight_map is not an object'),
    ({'weight_map': ['one.safetensors']}, 'its weight_map is not an object'),
    ({'weight_map': {'a': 1}}, 'its weight_map is not an object'),
    ({'weight_map': {}}, 'its weight_map is not an object'),
    ({'weight_map': {'a': '../one.safetensors'}}, "shard ../one.safetensors is not a file name inside the folder"),
    ({'weight_map': {'a': '/etc/passwd'}}, 'not a file name inside the folder'),
    ({'weight_map': {'a': 'x/../../one.safetensors'}}, 'not a file name inside the folder'),
    ({'weight_map': {'a': '..\\one.safetensors'}}, 'not a file name inside the folder'),
    ({'weight_map': {'a': 'C:one.safetensors'}}, 'not a file name inside the folder'),
    ({'weight_map': {'a': 'one.safetensors\nx'}}, r"lists are missing: \['one.safetensors\\nx'\]"),
    ({'weight_map': {'a': 'one.safetensors', 'b': 'one.safetensors', 'c': 'one.safetensors/'}},
     'not a file name inside'),
])
def test_shard_index_damage_is_one_line(tmp_path, index, message):
    folder = shard_folder(tmp_path, index)
    with pytest.raises(PretrainedError, match=message) as e:
        load_pretrained_state(folder)
    one_line(e.value, 'model.safetensors.index.json')


def test_shard_index_subfolder_loads_and_a_tensor_in_two_shards_is_refused(tmp_path):
    folder = shard_folder(tmp_path, {'weight_map': {'a': 'one.safetensors', 'b': 'sub/two.safetensors'}})
    os.makedirs(os.path.join(folder, 'sub'))
    os.replace(os.path.join(folder, 'two.safetensors'), os.path.join(folder, 'sub', 'two.safetensors'))
    assert sorted(load_pretrained_state(folder)) == ['a', 'b']
    save_safetensors({'a': torch.ones(2), 'b': torch.zeros(3)}, os.path.join(folder, 'sub', 'two.safetensors'))
    with pytest.raises(PretrainedError, match='tensor a is in another shard too') as e:
        load_pretrained_state(folder)
    one_line(e.value, 'two.safetensors')

# ----------------------------------------------------------------------------------------------------------
# bpe.py model files


@pytest.fixture(scope='module')
def trained():
    """A small byte-level BPE, with a merge list and settings so that every kind of line is in its file."""
    tok = bpe.train(TEXT * 20 + "the quick brown fox jumps over the lazy dog " * 20, vocab_size=300,
                    special_tokens=(bpe.ENDOFTEXT, '<|pad|>'), progress=False)
    merges = {pair: n for n, pair in enumerate(weights.recover_merges(tok.ranks))}
    return bpe.Tokenizer(tok.ranks, tok.pattern, tok.special_tokens, 'small', merges, ignore_merges=True,
                         normalizer='NFC', bos_token='<|pad|>', chat_template='{{ messages[0].content }}')


@pytest.fixture(scope='module')
def sentencepiece():
    """A small SentencePiece-style BPE merged by scores, as from a GGUF: byte pieces, specials, settings."""
    pieces = [f'<0x{b:02X}>' for b in range(256)] + ['\u2581', 'h', 'e', 'l', 'o', '\u2581h', 'he', 'll', 'llo',
                                                     '\u2581he', '\u2581hello']
    tokens = {i + 3: p for i, p in enumerate(pieces)}
    return bpe.SentencePieceBPE(tokens, {'<unk>': 0, '<s>': 1, '</s>': 2}, 'sp', scores={i: -i / 7 for i in tokens},
                                unk_token='<unk>', bos_token='<s>', eos_token='</s>', prepend_scheme='first',
                                split=True)


def edited(text, line):
    """text with line in place of the line of the same setting, or added at the end; and that line's number."""
    lines = text.rstrip('\n').split('\n')
    key = line.partition(' ')[0]
    at = next((n for n, old in enumerate(lines) if n and old.partition(' ')[0] == key and not key.isdigit() and
               key not in ('special', 'merge')), len(lines))
    lines[at:at + 1] = [line]
    return '\n'.join(lines) + '\n', at + 1


MODEL_CASES = [  # (the edited line, the message's regex, whether the message names the line)
    ('pattern 5', 'pattern is not a JSON string', True),
    ('pattern "(unclosed"', 'not a valid regex', True),
    ('pattern "' + '(' * 5000 + '"', 'not a valid regex', True),
    ('name ' + '[' * 100_000 + ']' * 100_000, 'is damaged', True),
    ('300 ' + '[' * 100_000 + ']' * 100_000, 'is damaged', True),
    ('name [1]', 'name is not a JSON string', True),
    ('100000000000000000000 "xy"', r"'10000000000000000000' is not an id \(0 to 2\*\*31 - 1\)", True),
    ('2147483648 "xy"', 'is not an id', True),
    ('-5 "xy"', "'-5' is no id, setting, special or merge", True),
    ('\u0661 "xy"', 'is not an id', True),  # an Arabic-Indic digit: int() would take it
    ('0 "dup"', 'id 0 has a line already', True),
    ('300 "xy" nan', 'the score nan is not a finite number', True),
    ('300 "xy" abc', 'is damaged', True),
    ('300 [256]', 'a token is a JSON string or a list of byte values', True),
    ('300 [true]', 'list of byte values', True),
    ('300 {"a": 1}', 'list of byte values', True),
    ('300 5', 'list of byte values', True),
    ('300 "\\ud800"', 'is damaged', True),
    ('special x "<|a|>"', "'x' is not an id", True),
    ('special 300 5', 'a special token is a non-empty JSON string', True),
    ('special 300 ""', 'a special token is a non-empty JSON string', True),
    ('special 301 "<|endoftext|>"', "special token '<|endoftext|>' has a line already", True),
    ('special 5 "<|a|>"', 'gives two tokens the same id', False),
    ('merge 1 2 3', 'is damaged', True),
    ('merge 1 99999', 'a merge names token 99999, which it does not have', False),
    ('merge 0 1', r"has a merge \(b'\\x00', b'\\x01'\) whose tokens are not all in its vocabulary", False),
    ('ignore_merges "yes"', 'ignore_merges is not true or false', True),
    ('normalizer "NFX"', "normalizer 'NFX' is not one of", True),
    ('eos_token 5', 'eos_token is not a JSON string or null', True),
    ('chat_template ["a"]', 'chat_template is not a JSON string or null', True),
    ('kind 5', 'kind is not a JSON string', True),
    ('kind "unigram"', "of kind 'unigram', which this bpe.py does not know", False),
    ('2147483647 "far"', r'has ids 0\.\.2147483647 for 301 tokens', False),
    ('300 "\\u0000"', 'two ids have the same token', False),
]


@pytest.mark.parametrize('line,message,names_line', MODEL_CASES)
def test_model_file_damage_is_one_line(tmp_path, trained, line, message, names_line):
    text, n = edited(trained.dumps(), line)
    path = str(tmp_path / 'bad.model')
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.load(path)
    one_line(e.value, f'{path}:{n} is damaged' if names_line else path)
    with pytest.raises(BPEError, match=message):
        bpe.Tokenizer.loads(text, where='x')


@pytest.mark.parametrize('line,message', [
    ('prepend_scheme "sometimes"', "prepend_scheme 'sometimes' is not one of legacy"),
    ('split 1', 'split is not true or false'),
    ('add_bos_token null', 'add_bos_token is not true or false'),
    ('unk_token {}', 'unk_token is not a JSON string or null'),
    ('300 [65]', 'a SentencePiece token is not text'),
    ('300 "x" inf', 'the score inf is not a finite number'),
])
def test_sentencepiece_model_file_damage_is_one_line(tmp_path, sentencepiece, line, message):
    text, _ = edited(sentencepiece.dumps(), line)
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.loads(text, where='sp.model')
    one_line(e.value, 'sp.model')


def test_model_files_still_load(trained, sentencepiece):
    for tok in (trained, sentencepiece):
        again = bpe.Tokenizer.loads(tok.dumps())
        assert again.dumps() == tok.dumps() and again.encode(TEXT, 'all') == tok.encode(TEXT, 'all')


def usable(tok):
    """A tokenizer that loaded must work: encode, decode, and its file read back the same."""
    tok.decode(tok.encode(TEXT, allowed_special='all'))
    assert bpe.Tokenizer.loads(tok.dumps()).dumps() == tok.dumps()


def shuffled(data, rng):
    """Copies of a model file's bytes with lines swapped, dropped, repeated, or given another line's value."""
    lines = data.split(b'\n')
    while True:
        out = lines[:]
        for _ in range(rng.randint(1, 3)):
            i, j, op = rng.randrange(1, len(out)), rng.randrange(1, len(out)), rng.randrange(4)
            if op == 0:
                out[i], out[j] = out[j], out[i]
            elif op == 1:
                out.insert(i, out[j])
            elif op == 2 and len(out) > 2:
                del out[i]
            else:
                out[i] = out[i].partition(b' ')[0] + b' ' + out[j].partition(b' ')[2]
        yield b'\n'.join(out)


def model_check(path):
    def check(raw):
        write_new(path, raw)
        try:
            tok = bpe.Tokenizer.load(path)
        except BPEError as e:
            one_line(e, path)
            return
        usable(tok)
    return check


@pytest.mark.parametrize('kind', ['bpe', 'sentencepiece'])
@pytest.mark.parametrize('how', ['damaged', 'shuffled'])
def test_model_file_fuzz(tmp_path, trained, sentencepiece, kind, how):
    data = (trained if kind == 'bpe' else sentencepiece).dumps().encode('utf-8')
    cases = (lambda rng: damaged(data, rng, alphabet=b'0123456789 "[]\\u-.\nen')) if how == 'damaged' else \
        (lambda rng: shuffled(data, rng))
    fuzz(cases, model_check(str(tmp_path / 'x.model')), seed=3, n=FUZZ_CASES // 2, seconds=FUZZ_SECONDS / 2)

# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (+ tokenizer_config.json)


@pytest.fixture(scope='module')
def hf_files(trained, sentencepiece):
    """{kind: (tokenizer.json, tokenizer_config.json)} as JSON trees: byte-level BPE (the trained one, in GPT-2's
    byte characters) and SentencePiece-style BPE with byte fallback, in the shapes the tokenizers library writes."""
    chars = {b: c for c, b in bpe.byte_chars().items()}
    shown = lambda t: ''.join(chars[b] for b in t)  # noqa: E731
    added = lambda specials: [{'id': i, 'content': t, 'special': True, 'lstrip': False, 'rstrip': False,  # noqa
                               'normalized': False, 'single_word': False} for t, i in specials.items()]
    byte_level = {'model': {'type': 'BPE', 'vocab': {shown(t): i for t, i in trained.ranks.items()},
                            'merges': [[shown(a), shown(b)] for a, b in sorted(trained.merges, key=trained.merges.get)],
                            'ignore_merges': True, 'dropout': None},
                  'added_tokens': added(trained.special_tokens), 'normalizer': {'type': 'NFC'},
                  'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
                      {'type': 'Split', 'pattern': {'Regex': bpe.LLAMA3_SPLIT_PATTERN}, 'behavior': 'Isolated',
                       'invert': False}, {'type': 'ByteLevel', 'add_prefix_space': False, 'use_regex': False}]},
                  'decoder': {'type': 'ByteLevel', 'add_prefix_space': True}}
    pieces = {p: i for i, p in sentencepiece.tokens.items()}
    spm = {'model': {'type': 'BPE', 'vocab': {'<unk>': 0, '<s>': 1, '</s>': 2, **pieces}, 'byte_fallback': True,
                     'unk_token': '<unk>', 'merges': ['\u2581 h', 'h e', 'l l', 'll o', '\u2581h e', '\u2581he llo']},
           'added_tokens': added(sentencepiece.special_tokens), 'normalizer': None,
           'pre_tokenizer': {'type': 'Metaspace', 'replacement': '\u2581', 'prepend_scheme': 'first', 'split': True},
           'decoder': {'type': 'Sequence', 'decoders': [
               {'type': 'Replace', 'pattern': {'String': '\u2581'}, 'content': ' '}, {'type': 'ByteFallback'},
               {'type': 'Fuse'}, {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]}}
    config = {'bos_token': {'content': '<|pad|>'}, 'eos_token': '<|endoftext|>', 'add_bos_token': False,
              'chat_template': [{'name': 'default', 'template': '{{ messages[0].content }}'}]}
    return {'bpe': (byte_level, config), 'sentencepiece': (spm, {'bos_token': '<s>', 'chat_template': 'x'})}


def hf_folder(tmp_path, hf, config=None):
    """tokenizer.json (a JSON tree, or bytes) and tokenizer_config.json (likewise; None: none) in tmp_path."""
    for name, value in (('tokenizer.json', hf), ('tokenizer_config.json', config)):
        if os.path.exists(tmp_path / name):
            os.remove(tmp_path / name)
        if value is not None:
            write_new(str(tmp_path / name), value if isinstance(value, bytes) else json.dumps(value).encode())
    return str(tmp_path)


def test_hf_files_load(tmp_path, hf_files):
    for kind, (hf, config) in hf_files.items():
        tok = bpe.Tokenizer.from_hf(hf_folder(tmp_path, hf, config))
        assert tok.kind == kind and tok.chat_template
        usable(tok)


def change(tree, path, value):
    """A copy of tree with the node at path (keys and indexes) set to value (DELETE: removed)."""
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


DELETE = object()
HF_CASES = [  # (kind, in the config file?, path, value, the message's regex)
    ('bpe', False, ('model',), 'BPE', 'its model is not a JSON object'),
    ('bpe', False, ('model',), [1], 'its model is not a JSON object'),
    ('bpe', False, ('model', 'type'), 5, 'its model type is not a string'),
    ('bpe', False, ('model', 'vocab'), [['a', 1]], r'its vocab is not \{token: id\} with ids 0 to 2\*\*31 - 1'),
    ('bpe', False, ('model', 'vocab', 'a'), -1, 'its vocab is not'),
    ('bpe', False, ('model', 'vocab', 'a'), 2 ** 40, 'its vocab is not'),
    ('bpe', False, ('model', 'vocab', 'a'), '97', 'its vocab is not'),
    ('bpe', False, ('model', 'vocab', 'a'), True, 'its vocab is not'),
    ('bpe', False, ('model', 'vocab', 'a'), 2 ** 31 - 1, r'has ids 0\.\.2147483647 for'),
    ('bpe', False, ('model', 'vocab', 'a'), 98, 'gives two tokens the same id'),
    ('bpe', False, ('model', 'merges'), {'a': 'b'}, 'its merges are not'),
    ('bpe', False, ('model', 'merges', 0), [1, 2], 'its merges are not'),
    ('bpe', False, ('model', 'merges', 0), ['a'], 'has a merge that is not two tokens'),
    ('bpe', False, ('model', 'merges', 0), 'a b c', 'has a merge that is not two tokens'),
    ('bpe', False, ('model', 'merges', 0), ['\u0100', '\u0101'], 'whose tokens are not all in its vocab'),
    ('bpe', False, ('added_tokens',), {'id': 1}, 'its added_tokens are not objects'),
    ('bpe', False, ('added_tokens', 0), 'x', 'its added_tokens are not objects'),
    ('bpe', False, ('added_tokens', 0, 'id'), '1', 'its added_tokens are not objects'),
    ('bpe', False, ('added_tokens', 0, 'content'), None, 'its added_tokens are not objects'),
    ('bpe', False, ('pre_tokenizer',), 'ByteLevel', 'its pre_tokenizer is not of the form'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers'), 'x', 'its pre_tokenizer is not of the form'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers', 0), None, 'its pre_tokenizer is not of the form'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers', 0, 'pattern'), {'Regex': 5}, 'pre_tokenizer is not of the'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers', 0, 'pattern'), {}, 'pre_tokenizer is not of the form'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers', 0, 'pattern'), {'Regex': '(x'}, 'not a valid regex'),
    ('bpe', False, ('pre_tokenizer', 'pretokenizers', 0, 'type'), ['Split'], 'pre_tokenizer is not of the form'),
    ('bpe', False, ('normalizer',), ['NFC'], 'its normalizer is not of the form'),
    ('bpe', False, ('normalizer',), {'type': 'Sequence', 'normalizers': [{'type': 'NFC'}] * 2}, 'the normalizer'),
    ('bpe', False, ('normalizer',), {'type': 'Sequence', 'normalizers': [[]]}, 'normalizer is not of the form'),
    ('bpe', False, ('decoder',), [], 'its decoder is not of the form'),
    ('bpe', False, ('decoder',), {'type': 'Sequence', 'decoders': [1]}, 'its decoder is not of the form'),
    ('bpe', False, ('model', 'vocab', '\ud800'), 400, 'is not JSON .* surrogates not allowed'),
    ('bpe', True, ('bos_token',), 5, 'tokenizer_config.json is damaged: its bos_token, eos_token or chat_template'),
    ('bpe', True, ('eos_token',), {'content': ['x']}, 'tokenizer_config.json is damaged'),
    ('bpe', True, ('chat_template',), 7, 'tokenizer_config.json is damaged'),
    ('bpe', True, ('chat_template', 0), 'default', 'tokenizer_config.json is damaged'),
    ('bpe', True, ('chat_template', 0, 'name'), [1], 'tokenizer_config.json is damaged'),
    ('sentencepiece', False, ('model', 'unk_token'), 0, 'its unk_token is not a string'),
    ('sentencepiece', False, ('pre_tokenizer', 'prepend_scheme'), 'sometimes', "prepend_scheme must be one of"),
    ('sentencepiece', False, ('decoder', 'decoders', 1, 'type'), ['ByteFallback'], 'its decoder is not of the'),
    ('sentencepiece', False, ('model', 'vocab', 'h'), 0, 'gives two tokens the same id'),
    ('sentencepiece', False, ('model', 'vocab', '<0x41>'), DELETE, None),  # a piece fewer is no damage
    ('sentencepiece', False, ('model', 'vocab', 'h'), DELETE, 'whose tokens are not all in its vocabulary'),
]


@pytest.mark.parametrize('kind,in_config,path,value,message', HF_CASES)
def test_tokenizer_json_damage_is_one_line(tmp_path, hf_files, kind, in_config, path, value, message):
    hf, config = hf_files[kind]
    if in_config:
        config = change(config, path, value)
    else:
        hf = change(hf, path, value)
    raw = json.dumps(hf).encode('utf-8', 'surrogatepass')  # (a lone surrogate, as a damaged file may hold)
    folder = hf_folder(tmp_path, raw, config)
    if message is None:
        return usable(bpe.Tokenizer.from_hf(folder))
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.from_hf(folder)
    one_line(e.value, os.path.join(folder, 'tokenizer_config.json' if in_config else 'tokenizer.json'))


@pytest.mark.parametrize('raw,message', [
    (b'[1, 2]', r'is not a JSON object \(it is a list\)'),
    (b'"x"', 'is not a JSON object'),
    (b'{"model": ' * 100_000, 'nested too deeply'),
    (b'{"normalizer": ' + b'[' * 5000 + b']' * 5000 + b'}', r'is not JSON bpe.py reads \(it is nested too deeply\)'),
    (b'{"model": {"type": "BPE", "vocab": {"\xff": 0}}}', 'is not JSON'),
])
def test_tokenizer_json_not_an_object(tmp_path, raw, message):
    folder = hf_folder(tmp_path, raw)
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.from_hf(folder)
    one_line(e.value, os.path.join(folder, 'tokenizer.json'))


def hf_check(folder):
    def check(files):
        hf_folder(folder, *files)
        try:
            tok = bpe.Tokenizer.from_hf(str(folder))
        except BPEError as e:
            one_line(e, str(folder))
            return
        usable(tok)
    return check


@pytest.mark.parametrize('kind', ['bpe', 'sentencepiece'])
def test_tokenizer_json_fuzz(tmp_path, hf_files, kind):
    hf, config = hf_files[kind]
    raw = json.dumps(hf).encode()

    def cases(rng):  # a node of either file swapped for an odd value; or, one case in five, bytes damaged
        flips = damaged(raw, rng, alphabet=b'0123456789-[]{}",:. \\u')
        while True:
            pick = rng.random()
            yield (next(flips), config) if pick < 0.2 else (mutated(hf, rng), config) if pick < 0.8 else \
                (hf, mutated(config, rng))
    fuzz(cases, hf_check(tmp_path), seed=4, n=FUZZ_CASES // 2, seconds=FUZZ_SECONDS / 2)

# ----------------------------------------------------------------------------------------------------------
# GGUF files and their tokenizer metadata


@pytest.fixture(scope='module')
def gguf_meta(trained):
    return {'general.architecture': 'llama', 'general.name': 'small', 'llama.block_count': 1,
            **weights.tokenizer_metadata(trained, 304)}


@pytest.fixture(scope='module')
def gguf_file(tmp_path_factory, gguf_meta):
    """The bytes of a small GGUF (the tokenizer, and an F32, an F16 and a Q8_0 tensor, at alignment 64) and the
    length of its header."""
    path = str(tmp_path_factory.mktemp('gguf') / 'small.gguf')
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    weights.write_gguf(path, gguf_meta, [('a.weight', 0, x.shape, x.tobytes()),
                                         ('b.weight', 1, x.shape, x.astype(np.float16).tobytes()),
                                         ('c.weight', 8, x.shape, weights.quantize(x, 8).tobytes())], alignment=64)
    data = open(path, 'rb').read()
    return data, data.index(x.tobytes())


def test_gguf_file_loads(tmp_path, gguf_file):
    g = weights.read_gguf(write_new(str(tmp_path / 'ok.gguf'), gguf_file[0]))
    assert sorted(g.tensors) == ['a.weight', 'b.weight', 'c.weight'] and g.metadata['general.alignment'] == 64
    usable(bpe.Tokenizer.from_gguf(g.metadata))


def test_gguf_alignment_of_another_type_is_refused(tmp_path):
    for value in (True, 1.0, 'x', 48):
        path = str(tmp_path / 'a.gguf')
        weights.write_gguf(path, {'general.alignment': value}, [])
        with pytest.raises(GGUFError, match='general.alignment is .*, not a power of two') as e:
            weights.read_gguf(path)
        one_line(e.value, path)


def gguf_check(path):
    """check(raw) for the fuzz: raw reads as GGUF, its tensors within the file and dequantized or refused, its
    tokenizer loaded and working or refused; or it is refused, always in one line that names the file."""
    def check(raw):
        write_new(path, raw)
        try:
            g = weights.read_gguf(path)
        except GGUFError as e:
            one_line(e, path)
            return
        for name, info in g.tensors.items():
            assert info.offset + info.nbytes <= len(raw), name
            try:
                g.tensor(name)
            except GGUFError as e:
                one_line(e, path)
        try:
            tok = bpe.Tokenizer.from_gguf(g.metadata, where=path)
        except BPEError as e:
            one_line(e, path)
            return
        usable(tok)
    return check


def test_gguf_fuzz_truncations_and_byte_flips(tmp_path, gguf_file):
    data, header = gguf_file
    fuzz(lambda rng: damaged(data, rng, flips_within=header, alphabet=b'\0\1\2\3\4\5\6\7\x08\x09\x0a\x0b\x0c\xff'),
         gguf_check(str(tmp_path / 'x.gguf')), seed=5)


@pytest.mark.parametrize('key,value,message', [
    ('tokenizer.ggml.tokens', 'abc', 'tokenizer.ggml.tokens is not a list of strings'),
    ('tokenizer.ggml.tokens', [1, 2], 'tokenizer.ggml.tokens is not a list of strings'),
    ('tokenizer.ggml.token_type', ['1'] * 304, 'tokenizer.ggml.token_type is not a list of integers'),
    ('tokenizer.ggml.token_type', [[1]] * 304, 'tokenizer.ggml.token_type is not a list of integers'),
    ('tokenizer.ggml.token_type', [1] * 3, '304 tokens, 3 token types'),
    ('tokenizer.ggml.scores', ['0'] * 304, 'tokenizer.ggml.scores is not a list of finite numbers'),
    ('tokenizer.ggml.scores', [float('nan')] * 304, 'tokenizer.ggml.scores is not a list of finite numbers'),
    ('tokenizer.ggml.merges', [1, 2], 'tokenizer.ggml.merges is not a list of strings'),
    ('tokenizer.ggml.merges', 'a b', 'tokenizer.ggml.merges is not a list of strings'),
    ('tokenizer.ggml.merges', ['a b c'], 'an entry of tokenizer.ggml.merges is not two tokens'),
    ('tokenizer.ggml.merges', ['\u0100 \u0101'], 'whose tokens are not all in its vocabulary'),
    ('tokenizer.ggml.pre', 5, 'tokenizer.ggml.pre is not a string'),
    ('tokenizer.ggml.pre', ['llama-bpe'], 'tokenizer.ggml.pre is not a string'),
    ('tokenizer.chat_template', 5, 'tokenizer.chat_template is not a string'),
    ('general.name', ['x'], 'general.name is not a string'),
    ('tokenizer.ggml.model', ['gpt2'], r"tokenizer.ggml.model \['gpt2'\] is not one bpe.py reads"),
    ('tokenizer.ggml.model', 5, 'tokenizer.ggml.model 5 is not one bpe.py reads'),
])
def test_gguf_tokenizer_metadata_of_wrong_types(gguf_meta, key, value, message):
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.from_gguf({**gguf_meta, key: value}, where='m.gguf')
    one_line(e.value, 'm.gguf')


def test_gguf_tokenizer_metadata_fuzz(gguf_meta):
    def check(meta):
        try:
            tok = bpe.Tokenizer.from_gguf(meta, where='m.gguf')
        except BPEError as e:
            one_line(e, 'm.gguf')
            return
        usable(tok)
    fuzz(lambda rng: (mutated(gguf_meta, rng) for _ in iter(int, 1)), check, seed=6, n=FUZZ_CASES // 2,
         seconds=FUZZ_SECONDS / 2)

# ----------------------------------------------------------------------------------------------------------
# bpe.py's command line: an output path that cannot be a file is refused before training, in one line


@pytest.mark.parametrize('option', ['out', 'tiktoken_out'])
@pytest.mark.parametrize('where,message', [
    ('folder', r'is a folder; give a file name, e.g. --{option}=.*folder'),
    ('file/x.model', r'cannot be written: .*file is a file, not a folder'),
    ('nowhere/x.model', r'cannot be written: .*nowhere does not exist: create it first'),
])
def test_cli_output_path_that_cannot_be_a_file(tmp_path, option, where, message):
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'in.txt').write_text(TEXT)
    out = str(tmp_path / where)
    argv = [f'--input={tmp_path / "in.txt"}', '--vocab_size=260', f'--{option}={out}']
    with pytest.raises(BPEError, match=message.format(option=option)) as e:
        bpe.main(argv + ([f'--out={tmp_path / "ok.model"}'] if option != 'out' else []))
    one_line(e.value, out)
    assert not os.path.exists(tmp_path / 'ok.model')  # refused before training


def test_cli_output_folder_is_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys
    (tmp_path / 'in.txt').write_text(TEXT)
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     'bpe.py'), f'--input={tmp_path / "in.txt"}', '--vocab_size=260',
                        f'--out={tmp_path}'], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith('error: ') and len(p.stderr.strip().splitlines()) == 1, p.stderr

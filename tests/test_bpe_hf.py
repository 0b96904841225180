"""Tests for bpe.Tokenizer.from_hf: tokenizer.json files built here with the `tokenizers` library (no
downloads), in the shapes of GPT-2, Llama 3, Qwen2 and SmolLM, must give exactly its ids and text.

    python -m pytest tests/test_bpe_hf.py -q
"""
import json
import os
import random
import unicodedata

import pytest
import tiktoken

pytest.importorskip('tokenizers')
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import bpe
from bpe import BPEError
from conftest import shared_file

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r'\p{N}{1,3}', r'\p{N}')
TRICKY = [
    '', ' ', 'hello world', "I'll've they'RE WE'LL it's 123456789 1234567 1,000.5 3.14159",
    '   leading and trailing   ', '\t\t tabs\t', 'a\n\n\nb\n', 'crlf\r\nline\r\n\r\n', '\r\r\n \n \r',
    'x  1 y 12  345   6789\n 0', 'ünïcödé naïve café', 'cafe\u0301 n\u0303 Å\u030a', '日本語のテキスト、中文。',
    'Ελληνικά и русский', 'emoji 👍🏽 👨‍👩‍👧‍👦 🇳🇱 🏳️‍🌈 ❤️', 'math 𝔸𝕓𝕔 ∑∫√ ≠ x² ½ ١٢٣', 'zero\u200bwidth\ufeffbom',
    '\x00\x01\x7f control', 'tokens <|endoftext|> in <pad>text<|endoftext|><|endoftext|>',
    'MY_NAME=42;',
]


@pytest.fixture(scope='module')
def text():
    with open(shared_file('wikitext2', 'wiki.valid.tokens'), encoding='utf-8') as f:
        wiki = f.read()
    with open(shared_file('tinyshakespeare.txt'), encoding='utf-8') as f:
        return wiki[:150_000] + f.read()[:150_000] + ''.join(TRICKY) * 20


def build(folder, pre_tokenizer, text, normalizer=None, ignore_merges=False, vocab_size=1500, config=None):
    """Train a byte-level BPE with the `tokenizers` library and save folder/tokenizer.json (+ config)."""
    hf = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    hf.pre_tokenizer, hf.decoder = pre_tokenizer, decoders.ByteLevel()
    if normalizer:
        hf.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>', '<pad>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([text], trainer)
    hf.add_tokens(['MY_NAME'])  # an added token that is not special
    os.makedirs(folder, exist_ok=True)
    hf.save(os.path.join(folder, 'tokenizer.json'))
    if config:
        with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
            json.dump(config, f)
    return folder


def byte_level(**kw):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, **kw)


STYLES = {  # name: (pre_tokenizer, normalizer, ignore_merges)
    'gpt2': (lambda: byte_level(), None, False),
    'llama3': (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), 'isolated'),
                                                byte_level(use_regex=False)]), normalizers.NFC, True),
    'qwen2': (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), 'isolated'),
                                               byte_level(use_regex=False)]), normalizers.NFC, False),
    'smollm': (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level()]),
               None, False),
    'gaps': (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r'\p{L}+|\d'), 'isolated'),
                                              byte_level(use_regex=False)]), None, False),  # text between matches
}


@pytest.fixture(scope='module')
def folders(tmp_path_factory, text):
    root = tmp_path_factory.mktemp('hf')
    return {name: build(str(root / name), pre(), text, norm and norm(), ignore)
            for name, (pre, norm, ignore) in STYLES.items()}


def assert_same(folder, texts, tok=None):
    """bpe.py's ids and text equal the `tokenizers` library's for each text."""
    hf, tok = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json')), tok or bpe.Tokenizer.from_hf(folder)
    for s in texts:
        ids = hf.encode(s, add_special_tokens=False).ids
        assert tok.encode(s, allowed_special='all') == ids, s
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), s
    return hf, tok


@pytest.mark.parametrize('style', STYLES)
def test_same_ids_and_text_as_tokenizers(folders, style, text):
    lines = text[:60_000].splitlines(keepends=True)
    hf, tok = assert_same(folders[style], TRICKY + lines + ['MY_NAME is <pad>', text[:60_000]])
    assert tok.special_tokens == {'<|endoftext|>': 0, '<pad>': 1, 'MY_NAME': 1500}
    assert tok.ignore_merges == STYLES[style][2] and tok.normalizer == ('NFC' if STYLES[style][1] else None)
    rng = random.Random(0)  # random ids: half characters and all must decode as HF does (U+FFFD)
    for _ in range(200):
        ids = [rng.randrange(hf.get_vocab_size()) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize('style', ['gpt2', 'llama3', 'smollm'])
def test_tiktoken_export_and_save_load_keep_the_ids(folders, style, text, tmp_path):
    tok = bpe.Tokenizer.from_hf(folders[style])
    sample = [unicodedata.normalize('NFC', s) for s in TRICKY + [text[:30_000]]]  # tiktoken does not normalize
    enc = tok.to_tiktoken()  # merges by rank = id: the same ids, since HF's trainer numbers tokens in merge order
    assert [enc.encode(s, allowed_special='all') for s in sample] == [tok.encode(s, allowed_special='all')
                                                                       for s in sample]
    tok.save(tmp_path / 'tok.model')
    again = bpe.Tokenizer.load(tmp_path / 'tok.model')
    assert (again.merges, again.ignore_merges, again.normalizer, again.pattern) == (
        tok.merges, tok.ignore_merges, tok.normalizer, tok.pattern)
    assert_same(folders[style], TRICKY + [text[:20_000]], again)


def test_ids_out_of_merge_order(folders, tmp_path, text):
    """Shuffled ids (and merges written as "a b" strings): HF merges by the list's order, not by id, and so
    does bpe.py; tiktoken (which merges by id) cannot, and to_tiktoken says so."""
    with open(os.path.join(folders['gpt2'], 'tokenizer.json'), encoding='utf-8') as f:
        spec = json.load(f)
    model = spec['model']
    new = list(range(len(model['vocab'])))
    random.Random(0).shuffle(new)
    model['vocab'] = {t: new[i] for t, i in model['vocab'].items()}
    model['merges'] = [' '.join(m) for m in model['merges']]
    for t in spec['added_tokens']:  # those not in the vocab (MY_NAME) keep the next free id, or HF renumbers
        t['id'] = model['vocab'].get(t['content'], t['id'])
    os.makedirs(tmp_path / 'shuffled')
    with open(tmp_path / 'shuffled' / 'tokenizer.json', 'w', encoding='utf-8') as f:
        json.dump(spec, f)
    _, tok = assert_same(str(tmp_path / 'shuffled'), TRICKY + [text[:60_000]])
    assert tok.special_tokens['<|endoftext|>'] == new[0]
    assert_same(str(tmp_path / 'shuffled'), TRICKY, bpe.Tokenizer.loads(tok.dumps()))  # the merge order is kept
    with pytest.raises(BPEError, match='out of merge order'):
        tok.to_tiktoken()


@pytest.mark.parametrize('ignore_merges', [True, False])
def test_ignore_merges_emits_a_word_in_the_vocab_whole(folders, tmp_path, ignore_merges):
    """A token no merge makes (as Llama 3's tiktoken-born vocab has): whole with ignore_merges, else merged."""
    with open(os.path.join(folders['gpt2'], 'tokenizer.json'), encoding='utf-8') as f:
        spec = json.load(f)
    spec['model']['vocab']['Ġzyxwv'] = 1500
    spec['added_tokens'][-1]['id'] = 1501  # MY_NAME moves up one
    spec['model']['ignore_merges'] = ignore_merges
    os.makedirs(tmp_path / 'extra')
    with open(tmp_path / 'extra' / 'tokenizer.json', 'w', encoding='utf-8') as f:
        json.dump(spec, f)
    _, tok = assert_same(str(tmp_path / 'extra'), ['a zyxwv b', ' zyxwv', 'zyxwv'] + TRICKY)
    assert (tok.ranks[b' zyxwv'] in tok.encode('a zyxwv')) == ignore_merges


@pytest.fixture(scope='module')
def tiktoken_cache():
    old = os.environ.get('TIKTOKEN_CACHE_DIR')
    os.environ['TIKTOKEN_CACHE_DIR'] = shared_file('tiktoken_cache')
    yield os.environ['TIKTOKEN_CACHE_DIR']
    os.environ.pop('TIKTOKEN_CACHE_DIR') if old is None else os.environ.update(TIKTOKEN_CACHE_DIR=old)


def test_real_gpt2_from_the_tiktoken_cache(tmp_path, text, tiktoken_cache):
    """GPT-2's own encoder.json and vocab.bpe (what HF's gpt2 tokenizer.json holds): HF, bpe.py and tiktoken agree."""
    with open(os.path.join(tiktoken_cache, '6c7ea1a7e38e3a7f062df639a5b80947f075ffe6'), encoding='utf-8') as f:
        vocab = json.load(f)
    with open(os.path.join(tiktoken_cache, '6d1cbeee0f20b3d9449abfede4726ed8212e3aee'), encoding='utf-8') as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer, hf.decoder = byte_level(), decoders.ByteLevel()
    hf.add_special_tokens([AddedToken('<|endoftext|>', special=True)])
    hf.save(str(tmp_path / 'tokenizer.json'))
    tok = bpe.Tokenizer.from_hf(tmp_path / 'tokenizer.json')
    sample = TRICKY + [text[:30_000]]
    assert_same(str(tmp_path), sample, tok)
    gpt2 = tiktoken.get_encoding('gpt2')
    for s in sample:
        assert tok.to_tiktoken().encode(s, allowed_special='all') == gpt2.encode(s, allowed_special='all')
    assert tok.eos_token_id == 50256 and tok.bos_token_id is None and tok.chat_template is None


def test_llama3_style_conversion_of_cl100k(tmp_path, text, tiktoken_cache):
    """Llama 3's tokenizer.json came from tiktoken ranks as transformers converts them: every split of a token
    into two tokens is a merge, ordered by the token's rank, and ignore_merges. Built here from cl100k_base
    (whose split regex Llama 3 uses): HF, bpe.py, its tiktoken export and tiktoken's cl100k give the same ids."""
    enc = tiktoken.get_encoding('cl100k_base')
    ranks, chars = enc._mergeable_ranks, {b: c for c, b in bpe.byte_chars().items()}
    show = lambda token: ''.join(chars[b] for b in token)
    merges = sorted((rank, ranks[t[:i]], ranks[t[i:]], show(t[:i]), show(t[i:])) for t, rank in ranks.items()
                    for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    vocab = {show(t): rank for t, rank in ranks.items()} | enc._special_tokens
    hf = Tokenizer(models.BPE(vocab, [m[3:] for m in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), 'isolated'),
                                                byte_level(use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in enc._special_tokens])
    hf.save(str(tmp_path / 'tokenizer.json'))
    sample = TRICKY + text[:100_000].splitlines(keepends=True)
    _, tok = assert_same(str(tmp_path), sample)
    assert tok.special_tokens == enc._special_tokens
    ours = [tok.encode(s, allowed_special='all') for s in sample]
    assert tok.to_tiktoken().encode_batch(sample, allowed_special='all') == ours
    assert enc.encode_batch(sample, allowed_special='all') == ours


def test_tokenizer_config_names_bos_eos_and_chat_template(folders, tmp_path, text):
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<pad>\n{% endfor %}"
    folder = build(str(tmp_path / 'chat'), byte_level(), text[:50_000], vocab_size=400, config={
        'bos_token': {'content': '<pad>', '__type': 'AddedToken'}, 'eos_token': 'MY_NAME', 'chat_template': template})
    tok = bpe.Tokenizer.from_hf(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template) == (1, 400, template)
    tok.save(tmp_path / 'tok.model')
    again = bpe.Tokenizer.load(tmp_path / 'tok.model')
    assert (again.bos_token_id, again.eos_token_id, again.chat_template) == (1, 400, template)
    plain = bpe.Tokenizer.from_hf(os.path.join(folders['gpt2'], 'tokenizer.json'))  # no config: <|endoftext|>
    assert (plain.bos_token_id, plain.eos_token_id, plain.chat_template) == (None, 0, None)


def write(tmp_path, hf):
    hf.save(str(tmp_path / 'tokenizer.json'))
    return tmp_path / 'tokenizer.json'


def wordpiece():
    hf = Tokenizer(models.WordPiece({'[UNK]': 0, 'a': 1}, unk_token='[UNK]'))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf


def metaspace():
    hf = Tokenizer(models.BPE({'▁': 0, 'a': 1, '▁a': 2}, [('▁', 'a')]))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return hf


def unigram():
    return Tokenizer(models.Unigram([('<unk>', 0.0), ('a', -1.0)], 0))


def byte_fallback():
    return Tokenizer(models.BPE({'<unk>': 0, '<0x61>': 1}, [], unk_token='<unk>', byte_fallback=True))


def prefix_space():
    hf = Tokenizer(models.BPE({c: i for i, c in enumerate(bpe.byte_chars())}, []))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()
    return hf


def digits_then_split():
    hf = prefix_space()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Split(Regex('a'), 'isolated'),
                                                byte_level(use_regex=False)])
    return hf


@pytest.mark.parametrize('make, message', [
    (metaspace, r'uses the Metaspace pre-tokenizer \(SentencePiece, e.g. Llama 2'),
    (wordpiece, r'uses the WordPiece model \(e.g. BERT\), which bpe.py does not support; byte-level BPE models '
                r'\(GPT-2, Llama 3, Qwen2, SmolLM\) load'),
    (unigram, r'uses the Unigram model \(SentencePiece'),
    (byte_fallback, r"uses byte_fallback=True \(SentencePiece"),
    (prefix_space, 'uses ByteLevel with add_prefix_space'),
    (digits_then_split, 'pre-tokenizers Digits then Split then ByteLevel, which bpe.py cannot write as one regex'),
])
def test_unsupported_tokenizers_say_why(tmp_path, make, message):
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.from_hf(write(tmp_path, make()))
    assert '\n' not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(BPEError, match='not found .from_hf takes a tokenizer.json file or the folder'):
        bpe.Tokenizer.from_hf(tmp_path)
    (tmp_path / 'tokenizer.json').write_text('{"model": ')
    with pytest.raises(BPEError, match='is not JSON'):
        bpe.Tokenizer.from_hf(tmp_path)


def test_a_post_processor_that_prepends_bos_means_add_bos_token(tmp_path, text):
    """Llama 2/3's tokenizer.json add BOS through a TemplateProcessing post-processor; transformers and
    lm-evaluation-harness then prepend it, so the model expects it even when tokenizer_config.json is silent."""
    from tokenizers import processors
    folder = build(str(tmp_path / 'bos'), byte_level(), text[:50_000], vocab_size=400,
                   config={'bos_token': '<pad>'})
    assert bpe.Tokenizer.from_hf(folder).add_bos_token is False
    hf = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    hf.post_processor = processors.TemplateProcessing(single='<pad> $A', special_tokens=[('<pad>', 1)])
    hf.save(os.path.join(folder, 'tokenizer.json'))
    assert bpe.Tokenizer.from_hf(folder).add_bos_token is True
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'bos_token': '<pad>', 'add_bos_token': False}, f)  # the config's word wins
    assert bpe.Tokenizer.from_hf(folder).add_bos_token is False

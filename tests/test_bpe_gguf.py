"""Tests for tokenizers read from GGUF metadata (bpe.Tokenizer.from_gguf), SentencePiece-style BPE (Llama 2's
shape, bpe.SentencePieceBPE, from a tokenizer.json and from a GGUF's metadata) and chat templates run as Jinja
(bpe.render_chat): the ids must be the `tokenizers` library's, the prompts transformers' apply_chat_template's.

    python -m pytest tests/test_bpe_gguf.py -q
"""
import json

import pytest

pytest.importorskip('tokenizers')
gguf = pytest.importorskip('gguf')
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import bpe
from bpe import BPEError
from conftest import shared_file

PROBES = [
    '', 'Hello world', "I'll've they'RE it's", 'def f(x):\n    return x ** 2  # square\n', 'x = {"a": [1, 2]};',
    '1234567 3.14159 1,000.5 007', 'emoji 👍🏽 👨‍👩‍👧 🇳🇱', '日本語のテキスト、中文。', 'ünïcödé café', '   lead and trail   ',
    '\t\t tabs\t', 'a\n\n\nb\n', 'crlf\r\nline\r\n\r\n', ' \n \t\n  \n', '\x00\x01\x7f control', '.\x04.', 'a\x04b',
    'x\U00040000y', '!\U00080000!', '<|im_start|>user\nhi<|im_end|>\n', 'text<|endoftext|><|endoftext|>',
    '<s>hi</s> a<s> b', 'x\u2581y ▁ z', ''.join(map(chr, range(256))),
] + [chr(i) for i in range(256)]
SMOLLM2 = ('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')


def gguf_metadata(path):
    """{key: value} of a GGUF file's metadata: the plain dict weights.py hands to bpe.py."""
    fields = gguf.GGUFReader(path).fields
    return {key: field.contents() for key, field in fields.items() if not key.startswith('GGUF.')}


def ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


def assert_same_ids(tok, hf, probes=PROBES):
    for text in probes:
        want = ids(hf, text)
        assert tok.encode(text, allowed_special='all') == want, text  # HF always cuts out its added tokens
        assert tok.decode(want) == hf.decode(want, skip_special_tokens=False), text

# ----------------------------------------------------------------------------------------------------------
# SmolLM2's real vocabulary, from its GGUF file: byte-level BPE that lacks 21 of the 256 bytes


@pytest.fixture(scope='module')
def smollm2():
    return gguf_metadata(shared_file(*SMOLLM2))


@pytest.fixture(scope='module')
def smollm2_tok(smollm2):
    return bpe.Tokenizer.from_gguf(smollm2)


@pytest.fixture(scope='module')
def smollm2_hf(smollm2):
    """The `tokenizers` library's tokenizer of that vocabulary, shaped as SmolLM2's own tokenizer.json: digits
    one by one, then GPT-2's ByteLevel. (transformers' GGUF loader would also do, but takes ~10 s to build.)"""
    tokens, types = smollm2['tokenizer.ggml.tokens'], smollm2['tokenizer.ggml.token_type']
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                              [tuple(m.split(' ')) for m in smollm2['tokenizer.ggml.merges']]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return hf


def test_smollm2_from_gguf_gives_the_ids_of_tokenizers(smollm2_tok, smollm2_hf):
    tok = smollm2_tok
    assert (tok.vocab_size, len(tok.special_tokens), tok.pattern) == (49152, 17, bpe.GPT2_DIGITS_PATTERN)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ('<|im_start|>', 1, '<|im_end|>', 2)
    assert tok.add_bos_token is False and '<|im_start|>' in tok.chat_template
    assert len(tok.missing) == 21 and b'\x04' in tok.missing  # no token for these bytes: dropped, as HF does
    assert ids(smollm2_hf, '.\x04.') == tok.encode('.\x04.') == tok.encode('..')  # and its neighbours then merge
    assert_same_ids(tok, smollm2_hf)
    enc = tok.to_tiktoken()  # fast, and still exact: text that holds a missing byte goes to encode()
    assert all(enc.encode(text, allowed_special='all') == ids(smollm2_hf, text) for text in PROBES)
    assert enc.encode_ordinary_batch(['.\x04.', 'hi 12']) == [ids(smollm2_hf, '.\x04.'), ids(smollm2_hf, 'hi 12')]


def test_tokenizer_json_that_lacks_bytes_loads(smollm2_hf, tmp_path):
    smollm2_hf.save(str(tmp_path / 'tokenizer.json'))
    tok = bpe.Tokenizer.from_hf(tmp_path)
    assert len(tok.missing) == 21
    assert_same_ids(tok, smollm2_hf)


def test_smollm2_dumps_loads(smollm2_tok, smollm2_hf):
    tok = smollm2_tok
    again = bpe.Tokenizer.loads(tok.dumps())
    assert type(again) is bpe.Tokenizer and again.dumps() == tok.dumps()
    assert (again.ranks, again.merges, again.special_tokens) == (tok.ranks, tok.merges, tok.special_tokens)
    assert (again.bos_token, again.eos_token, again.chat_template) == (tok.bos_token, tok.eos_token, tok.chat_template)
    assert_same_ids(again, smollm2_hf, PROBES[:30])


def test_pre_names_map_to_their_regex(smollm2):
    meta = dict(smollm2, **{'tokenizer.ggml.pre': 'llama-bpe'})
    del meta['tokenizer.ggml.add_bos_token']
    tok = bpe.Tokenizer.from_gguf(meta)
    assert tok.pattern == bpe.LLAMA3_SPLIT_PATTERN and tok.ignore_merges and tok.add_bos_token  # llama.cpp's defaults
    assert bpe.Tokenizer.from_gguf(dict(smollm2, **{'tokenizer.ggml.pre': 'qwen2'})).normalizer == 'NFC'
    for name in ('gpt-2', 'smollm', 'llama-bpe', 'qwen2'):
        assert bpe.pre_name(bpe.GGUF_PRE_PATTERNS[name]) == name
    assert bpe.pre_name('gpt4') == 'llama-bpe' and bpe.pre_name(bpe.isolated(bpe.LLAMA3_SPLIT_PATTERN)) == 'llama-bpe'


@pytest.mark.parametrize('change, message', [
    ({'tokenizer.ggml.pre': 'bloom'}, r"tokenizer.ggml.pre 'bloom' names a split regex bpe.py does not know "
                                      r"\(it knows gpt-2, .*smollm"),
    ({'tokenizer.ggml.tokens': None}, 'has no tokenizer.ggml.tokens'),
    ({'tokenizer.ggml.model': 't5'}, r"tokenizer.ggml.model 't5' is not one bpe.py reads \('gpt2'.*'llama'"),
    ({'tokenizer.ggml.model': None}, 'has no tokenizer.ggml.model'),
    ({'tokenizer.ggml.merges': None}, 'has no tokenizer.ggml.merges'),
])
def test_gguf_errors_say_what_to_do(smollm2, change, message):
    meta = {key: value for key, value in dict(smollm2, **change).items() if value is not None}
    with pytest.raises(BPEError, match=message) as e:
        bpe.Tokenizer.from_gguf(meta)
    assert '\n' not in str(e.value)

# ----------------------------------------------------------------------------------------------------------
# SentencePiece-style BPE, in Llama 2's shape, trained here with the `tokenizers` library

SPECIALS = ['<unk>', '<s>', '</s>']


@pytest.fixture(scope='module')
def llama_vocab():
    """(vocab, merges) in Llama 2's layout: <unk> <s> </s>, the 256 byte pieces <0x00>.., then BPE learned on
    '▁' words of Tiny Shakespeare's first 100 KB."""
    with open(shared_file('tinyshakespeare.txt'), encoding='utf-8') as f:
        text = f.read()[:100_000]
    hf = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()  # split at each '▁': no merge crosses a word
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS, show_progress=False))
    model = json.loads(hf.to_str())['model']
    order = SPECIALS + [f'<0x{b:02X}>' for b in range(256)] + [t for t in sorted(model['vocab'], key=model['vocab'].get)
                                                                 if t not in SPECIALS]
    return {t: i for i, t in enumerate(order)}, [tuple(m) if isinstance(m, list) else tuple(m.split(' '))
                                                  for m in model['merges']]


def llama_style(vocab, merges, form='legacy', split=False):
    """A tokenizer.json shape: 'legacy' as Llama 2's (normalizers Prepend + Replace), or a Metaspace pre-tokenizer
    with that prepend_scheme, as newer conversions write; the decoder Llama 2's."""
    hf = Tokenizer(models.BPE(vocab, merges, unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    if form == 'legacy':
        hf.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=form, split=split)
    hf.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(' ', 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return hf


@pytest.mark.parametrize('form, split', [('legacy', False), ('first', False), ('always', True)])
def test_sentencepiece_tokenizer_json(llama_vocab, tmp_path, form, split):
    hf = llama_style(*llama_vocab, form, split)
    hf.save(str(tmp_path / 'tokenizer.json'))
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': '</s>'}))
    tok = bpe.Tokenizer.from_hf(tmp_path)
    assert isinstance(tok, bpe.SentencePieceBPE) and (tok.prepend_scheme, tok.split) == (form, split)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.add_bos_token) == (1, 2, 0, True)
    assert_same_ids(tok, hf)
    assert tok.encode('日') == [tok.pieces[p] for p in ('▁', '<0xE6>', '<0x97>', '<0xA5>')]  # byte fallback
    for text in PROBES:  # decoding takes off the space that 'legacy' put before the text: the text comes back
        if form == 'legacy' and not any(s in text for s in ('<s>', '</s>', '▁')):
            assert tok.decode(tok.encode(text)) == text
    again = bpe.Tokenizer.loads(tok.dumps())
    assert type(again) is bpe.SentencePieceBPE and again.dumps() == tok.dumps()
    assert_same_ids(again, hf, PROBES[:30])
    with pytest.raises(BPEError, match='SentencePiece-style BPE, which tiktoken cannot run'):
        tok.to_tiktoken()


def llama_gguf(vocab, merges):
    """GGUF metadata of the vocabulary as llama.cpp's converter writes it: a score per piece (here minus the
    priority of the merge that made it: the merge order), token types 2 unknown, 3 control, 6 byte, 1 normal."""
    made = {}
    for n, (a, b) in enumerate(merges):
        made.setdefault(a + b, n)
    tokens = sorted(vocab, key=vocab.get)
    return {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': tokens,
            'tokenizer.ggml.scores': [0.0 if t in SPECIALS else -float(made.get(t, len(merges))) for t in tokens],
            'tokenizer.ggml.token_type': [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259),
            'tokenizer.ggml.bos_token_id': 1, 'tokenizer.ggml.eos_token_id': 2, 'tokenizer.ggml.unknown_token_id': 0}


def test_sentencepiece_from_gguf_merges_by_scores_as_llama_cpp(llama_vocab, tmp_path):
    """llama.cpp merges any adjacent pair that spells a piece, the best-scored first; a merge list allows only
    its pairs. So scores equal a merge list that holds every pair spelling a piece, ordered by the piece's score:
    what transformers' generate_merges builds from a SentencePiece vocabulary. (On a trained list the two agree
    nearly always; test_scores_and_merge_lists_can_differ shows where not.)"""
    from transformers.tokenization_utils_base import generate_merges
    vocab, merges = llama_vocab
    meta = llama_gguf(vocab, merges)
    tok = bpe.Tokenizer.from_gguf(meta)
    assert isinstance(tok, bpe.SentencePieceBPE) and tok.prepend_scheme == 'legacy' and tok.add_bos_token
    every_pair = generate_merges(vocab, dict(zip(meta['tokenizer.ggml.tokens'], meta['tokenizer.ggml.scores'])))
    assert_same_ids(tok, llama_style(vocab, every_pair))
    assert_same_ids(tok, llama_style(vocab, merges), PROBES[:30])  # the trained list agrees here
    again = bpe.Tokenizer.loads(tok.dumps())
    assert again.scores == tok.scores and again.dumps() == tok.dumps()
    # what weights.py writes to a GGUF file for the tokenizer.json: this metadata, padded with unused tokens
    llama_style(vocab, merges).save(str(tmp_path / 'tokenizer.json'))
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': '</s>'}))
    out = bpe.Tokenizer.from_hf(tmp_path).gguf_metadata(len(vocab) + 3)
    for key, value in meta.items():
        assert (out[key][:len(vocab)] if isinstance(value, list) else out[key]) == value, key
    assert out['tokenizer.ggml.token_type'][-3:] == [5, 5, 5]
    assert bpe.Tokenizer.from_gguf(meta | {'tokenizer.ggml.add_space_prefix': False}).prepend_scheme == 'never'


def test_scores_and_merge_lists_can_differ():
    tokens = {0: 'a', 1: 'b', 2: 'c', 3: 'ab', 4: 'bc', 5: 'abc'}
    listed = bpe.SentencePieceBPE(tokens, merges={('b', 'c'): 0, ('a', 'b'): 1, ('ab', 'c'): 2}, prepend_scheme='never')
    scored = bpe.SentencePieceBPE(tokens, scores={3: -1.0, 4: 0.0, 5: -2.0}, prepend_scheme='never')
    assert listed.encode('abc') == [0, 4]  # b+c first, and (a, bc) is not in the list
    assert scored.encode('abc') == [5]     # b+c first, then a+bc spells abc: llama.cpp's ids


def test_sentencepiece_tokenizer_json_errors(llama_vocab, tmp_path):
    hf = llama_style(*llama_vocab)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Lowercase()])
    hf.save(str(tmp_path / 'tokenizer.json'))
    with pytest.raises(BPEError, match="the normalizer .*Lowercase.* with SentencePiece-style BPE, which bpe.py "
                                       "does not support") as e:
        bpe.Tokenizer.from_hf(tmp_path)
    assert '\n' not in str(e.value)

# ----------------------------------------------------------------------------------------------------------
# chat templates, against transformers' apply_chat_template

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
FEATURES_TEMPLATE = (  # loop controls, tojson (non-ASCII and HTML kept), strftime_now, tools set to none
    "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m | tojson }}\n"
    "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}{{ strftime_now('%Y') }}"
    "{% if tools is not none %}tools{% endif %}{{ bos_token }}|{{ unk_token }}|")
CHATS = [
    [{'role': 'user', 'content': 'Hi there'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}],
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': ' Hello! '},
     {'role': 'user', 'content': 'ü?'}],
    [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'},
     {'role': 'user', 'content': 'c', 'name': None}],
]


@pytest.fixture(scope='module')
def transformers_tokenizer():
    transformers = pytest.importorskip('transformers')
    hf = Tokenizer(models.BPE({'<s>': 0, '</s>': 1, 'a': 2}, []))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token='<s>', eos_token='</s>')


@pytest.mark.parametrize('chat', CHATS)
@pytest.mark.parametrize('generation_prompt', [True, False])
def test_chat_prompts_equal_transformers(smollm2_tok, transformers_tokenizer, chat, generation_prompt):
    for template, render in ((smollm2_tok.chat_template, smollm2_tok.apply_chat_template),
                             (LLAMA2_TEMPLATE, lambda m, g: bpe.render_chat(LLAMA2_TEMPLATE, m, g, '<s>', '</s>')),
                             (FEATURES_TEMPLATE, lambda m, g: bpe.render_chat(FEATURES_TEMPLATE, m, g, '<s>', '</s>'))):
        want = transformers_tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False,
                                                          add_generation_prompt=generation_prompt)
        assert render(chat, generation_prompt) == want


def test_chat_template_errors_are_one_line():
    with pytest.raises(BPEError, match='roles must alternate'):
        bpe.render_chat(LLAMA2_TEMPLATE, [{'role': 'assistant', 'content': 'x'}], bos_token='<s>', eos_token='</s>')
    with pytest.raises(BPEError, match=r'is not valid Jinja \(line 1'):
        bpe.render_chat('{% if %}', CHATS[0])
    with pytest.raises(BPEError, match='failed on these messages .TypeError'):
        bpe.render_chat("{{ messages[0]['content'] + 1 }}", CHATS[0])
    with pytest.raises(BPEError, match='has no chat template'):
        bpe.train('a b c', 300, progress=False).apply_chat_template(CHATS[0])

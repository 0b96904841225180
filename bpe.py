"""
Byte-level BPE: train your own tokenizer fast, encode it in readable pure Python, hand it to tiktoken to run.
Also reads the tokenizers of Hugging Face and GGUF models, SentencePiece-style BPE (Llama 2, Mistral) included.

    python bpe.py --input=data/ --vocab_size=32000 --out=tok.model     # train on files, folders, .jsonl
    python bpe.py --input=data/ --vocab_size=32000 --chat_tokens=False  # without ChatML's tokens and template
    python bpe.py --model=tok.model --encode="Hello world"              # a quick look at the ids
    python bpe.py --model=gpt2 --decode=15496,995                       # gpt2, cl100k_base: tiktoken's files

After `import bpe` (this file needs only the standard library, regex and tiktoken, so copy it anywhere):
    tok = bpe.train(['input.txt'], vocab_size=32000)   # a str is the text itself, a list holds paths
    ids = tok.encode('hi<|endoftext|>', allowed_special='all')
    enc = tok.to_tiktoken()                             # the same ids, fast: what prepare.py uses
    tok.save('tok.model'); tok = bpe.Tokenizer.load('tok.model')
    text = tok.dumps(); tok = bpe.Tokenizer.loads(text)  # the same file's text, in memory
    tok = bpe.Tokenizer.from_hf('SmolLM2-135M/')        # a Hugging Face tokenizer.json: the same ids as its own
    tok = bpe.Tokenizer.from_gguf(bpe.read_gguf_metadata('model.gguf'))   # a GGUF file's tokenizer
    prompt = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}])   # its Jinja chat template (jinja2)

The command line reserves <|endoftext|> and ChatML's <|im_start|> and <|im_end|> (single ids, the last ones) and
keeps ChatML's chat template in the file, unless --chat_tokens=False.

Training (train_ranks) is minbpe's algorithm, made fast in two ways. Text is cut into chunks by a regex
(GPT-2's or GPT-4's split pattern) and each unique chunk is stored once, with its count. And where minbpe
recounts every pair of the whole text after every merge, here the pair counts are kept up to date: merging
(a, b) into z only touches the chunks that hold (a, b), and for each occurrence subtracts the pairs it
destroys ((x, a), (b, y)) and adds the pairs it makes ((x, z), (z, y)). A heap picks the next best pair.

Encoding follows tiktoken's rule, so the two give identical ids: within a chunk, repeatedly merge the adjacent
pair whose joined bytes are the lowest-ranked token (leftmost first). Ids are ranks: the 256 bytes, then the
merges in the order they were learned, then the special tokens. The same rule reproduces GPT-2 and GPT-4.
This file imports only the standard library and regex (tiktoken for the fast path, tqdm for progress bars,
jinja2 for chat templates).
"""
import base64
import codecs
import difflib
import functools
import heapq
import json
import math
import mmap
import os
import struct
import sys
import time
import unicodedata
from collections import Counter, defaultdict

import regex

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

# tiktoken's strings, character for character: a pattern that differs even in whitespace handling gives
# different chunks, and so different ids, from the tiktoken export
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                      r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# Hugging Face's (tokenizer.json): Llama 3's differs from GPT-4's only in how it cuts whitespace that ends the text
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r'\p{N}{1,3}', r'\p{N}')  # one digit a chunk
PATTERNS = {'gpt2': GPT2_SPLIT_PATTERN, 'gpt4': GPT4_SPLIT_PATTERN, 'cl100k': GPT4_SPLIT_PATTERN,
            'llama3': LLAMA3_SPLIT_PATTERN, 'qwen2': QWEN2_SPLIT_PATTERN}
ENDOFTEXT = '<|endoftext|>'
# ChatML, the chat format of Qwen and SmolLM: prepare.py and the command line below reserve these tokens and set this
# template, so that a model trained from scratch chats in it (the template's text writes them; a message's never does)
CHATML_TOKENS = ('<|im_start|>', '<|im_end|>')
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
FILE_HEADER = 'bpe.py tokenizer v1'
NONE = sys.maxsize  # the rank of a byte string that is not a token
OPTIONAL = {'ignore_merges': False, 'normalizer': None, 'bos_token': None, 'eos_token': ENDOFTEXT,
            'chat_template': None, 'add_bos_token': False}  # settings that model files hold when not these


class BPEError(ValueError):
    """A mistake in the input (a path, a setting, disallowed special text): one line the user can act on."""


def tokenizer_identity(tok):
    """What must match for existing data to be reused: the kind, and for bpe the file's sha256 or the
    training settings (the text is compared separately)."""
    if tok['kind'] != 'bpe':
        return tok['kind']  # a char vocabulary follows from the text
    return {'trained': tok['trained']} if 'trained' in tok else {'sha256': tok['sha256']}


def chunker(pattern):
    """A function text -> list of regex chunks (a name in PATTERNS or any regex).

    >>> chunker('gpt4')("Hello world's  123456")
    ['Hello', ' world', "'s", ' ', ' ', '123', '456']
    """
    pattern = PATTERNS.get(pattern, pattern)
    try:
        rx = regex.compile(pattern)
    except (regex.error, RecursionError) as e:  # RecursionError: groups nested thousands deep
        raise BPEError(f"split pattern {pattern!r:.80} is not a valid regex ({e or 'nested too deeply'})") from None
    if rx.groups:  # findall would return the groups, not the whole matches
        return lambda text: [m.group() for m in rx.finditer(text)]
    return rx.findall


def valid_text(text):
    """text, with lone surrogates (which UTF-8 cannot hold) replaced by U+FFFD, as tiktoken does.

    >>> valid_text('a\\ud800b') == 'a\\ufffdb'
    True
    """
    try:
        text.encode('utf-8')
        return text
    except UnicodeEncodeError:
        return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')


def special_regex(tokens):
    """A regex matching any of the special token strings, longest first (so one that extends another wins)."""
    return regex.compile('|'.join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))

# ----------------------------------------------------------------------------------------------------------
# training input: files, folders, .jsonl, read in blocks so memory does not grow with the corpus


def list_files(paths):
    """The files named by paths, folders expanded recursively (sorted, hidden entries skipped)."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                found += [os.path.join(folder, n) for n in sorted(names) if not n.startswith('.')]
            if not found:
                raise BPEError(f"folder {path} has no files to train on")
            files += found
        else:
            raise BPEError(f"{path} not found (--input takes text files, .jsonl files and folders, comma-separated)")
    return files


def read_blocks(path, block_size=1 << 20):
    """Yield a UTF-8 file's text in blocks of about block_size bytes, ending at a line end where one is near.
    Read as bytes and decoded here, so CRLF stays CRLF and a bad byte is reported with its position."""
    decoder, offset = codecs.getincrementaldecoder('utf-8')(), 0
    with open(path, 'rb') as f:
        while data := f.read(block_size) + f.readline(block_size):
            if b'\0' in data:
                raise BPEError(f"{path} looks binary (a NUL byte at offset {offset + data.index(0)}); "
                               f"train on UTF-8 text files, .jsonl files or folders of them")
            try:
                yield decoder.decode(data)
            except UnicodeDecodeError as e:
                raise BPEError(f"{path} is not UTF-8 text (byte {data[e.start]:#04x} near offset "
                               f"{offset + e.start})") from None
            offset += len(data)
    try:
        decoder.decode(b'', final=True)
    except UnicodeDecodeError:
        raise BPEError(f"{path} is not UTF-8 text (it ends inside a multi-byte character)") from None


def read_jsonl(path):
    """Yield the 'text' of each record of a .jsonl file (one JSON object per line)."""
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise BPEError(f"{path}:{n} is not a JSON record ({e})") from None
            text = record.get('text') if isinstance(record, dict) else record
            if not isinstance(text, str):
                keys = ', '.join(record) if isinstance(record, dict) else type(record).__name__
                raise BPEError(f"{path}:{n} has no 'text' string to train on (found: {keys})")
            yield text


def read_documents(files):
    """Yield each document as an iterable of text blocks: a file, or one record of a .jsonl file."""
    for path in files:
        if path.endswith('.jsonl'):
            yield from ([text] for text in read_jsonl(path))
        else:
            yield read_blocks(path)


def count_chunks(documents, pattern, special_tokens=()):
    """{chunk: count} over documents, each an iterable of text blocks. Special tokens are cut out first, so
    no merge ever spans one. A block's last two chunks are carried over to the next block: the last may go on
    there, and the one before may be cut differently once more text follows (GPT-2 splits "'l" + "l" as "'ll").

    >>> count_chunks([['hi hi', ' hi'], ['hi<|endoftext|>']], 'gpt4', ['<|endoftext|>'])
    Counter({'hi': 2, ' hi': 2})
    """
    split, cut = chunker(pattern), special_regex(special_tokens).split if special_tokens else None
    counts = Counter()
    for document in documents:
        carry = ''
        for block in document:
            *whole, rest = cut(carry + block) if cut else [carry + block]
            for piece in whole:
                counts.update(split(piece))
            chunks = split(rest)
            carry = ''.join(chunks[-2:])
            del chunks[-2:]
            counts.update(chunks)
        counts.update(split(carry))
    counts.pop('', None)
    return counts

# ----------------------------------------------------------------------------------------------------------
# training


def train_ranks(chunk_counts, n_tokens, min_frequency=1, progress=False):
    """Byte-level BPE on {chunk bytes: count}: {token bytes: id} for the 256 bytes, then one token per merge,
    until there are n_tokens or no pair occurs min_frequency times. Each merge takes the most frequent pair;
    ties go to the smallest (left id, right id), i.e. to the oldest tokens, bytes by value. train_ranks_naive
    below is the same algorithm written plainly: the two must agree.

    >>> ranks = train_ranks({b'aaabdaaabac': 1}, 259)    # the textbook example: aa, ab, then aaab
    >>> sorted(ranks, key=ranks.get)[256:]
    [b'aa', b'ab', b'aaab']
    """
    tokens = [bytes([i]) for i in range(256)]              # id -> bytes
    ranks = {t: i for i, t in enumerate(tokens)}           # bytes -> id
    words = [list(chunk) for chunk in chunk_counts]        # each unique chunk as ids, merged in place
    freqs = list(chunk_counts.values())
    counts = defaultdict(int)   # (left, right) -> occurrences in the corpus
    where = defaultdict(set)    # (left, right) -> the words that hold it (some may no longer: that is harmless)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += freq
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in counts.items()]  # lazily updated: an entry may hold an outdated count
    heapq.heapify(heap)
    heappush, heappop = heapq.heappush, heapq.heappop
    bar = tqdm(total=n_tokens - 256, desc='merges', disable=not progress) if tqdm and progress else None
    while len(tokens) < n_tokens and heap:
        n, pair = heappop(heap)
        if counts.get(pair, 0) != -n:  # outdated: the pair lost occurrences since; file it under its count now
            if counts.get(pair, 0) > 0:
                heappush(heap, (-counts[pair], pair))
            continue
        if -n < min_frequency:
            break
        a, b = pair
        token = tokens[a] + tokens[b]
        z = ranks.get(token)
        if z is None:  # else two pairs spell the same bytes: the chunks reuse that token, as tiktoken would
            z = ranks[token] = len(tokens)
            tokens.append(token)
            if bar:
                bar.update()
        born = set()  # the pairs this merge creates: (x, z) and (z, y)
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            i, last = 0, len(word) - 1
            while i < last:
                if word[i] == a and word[i + 1] == b:
                    if i:  # left neighbour x: (x, a) becomes (x, z); x may be a z just made
                        x = word[i - 1]
                        counts[x, a] -= freq
                        new = x, z
                        counts[new] += freq
                        where[new].add(w)
                        born.add(new)
                    if i + 1 < last:  # right neighbour y: (b, y) becomes (z, y)
                        y = word[i + 2]
                        counts[b, y] -= freq
                        new = z, y
                        counts[new] += freq
                        where[new].add(w)
                        born.add(new)
                    word[i] = z
                    del word[i + 1]
                    last -= 1
                i += 1
        del counts[pair]
        for p in born:
            if counts[p] > 0:
                heappush(heap, (-counts[p], p))
    if bar:
        bar.close()
    return ranks


def count_pairs(ids, counts=None, weight=1):
    """{(left, right): occurrences} of the adjacent pairs in ids, added (weight times each) to counts.

    >>> count_pairs([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids, pair, new_id):
    """ids with every occurrence of pair replaced by new_id, left to right (so in a run, the leftmost wins).

    >>> merge_pair([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge_pair([1, 1, 1], (1, 1), 4)
    [4, 1]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_ranks_naive(text_or_chunks, n_tokens, pattern='gpt4', min_frequency=1):
    """train_ranks the readable way, minbpe's: after every merge, recount every pair of every chunk. That is
    quadratic (merges x text), too slow to train with, but it is the definition: train_ranks must give the
    same {token bytes: id}, merge for merge. text_or_chunks: a str, cut by pattern as train() cuts it (without
    cutting out special tokens), or {chunk bytes: count} as train_ranks takes.

    >>> ranks = train_ranks_naive('aaabdaaabac', 259, pattern=r'(?s).+')
    >>> sorted(ranks, key=ranks.get)[256:]
    [b'aa', b'ab', b'aaab']
    """
    if isinstance(text_or_chunks, str):
        text_or_chunks = Counter(valid_text(c).encode('utf-8') for c in chunker(pattern)(text_or_chunks))
    chunks = [(list(chunk), n) for chunk, n in text_or_chunks.items()]  # each unique chunk once, with its count
    tokens = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(tokens)}  # bytes -> id
    while len(tokens) < n_tokens:
        counts = {}
        for ids, n in chunks:
            count_pairs(ids, counts, n)
        if not counts:
            break
        # the most frequent pair, ties to the smallest (left, right) as train_ranks' heap pops them (minbpe's
        # max(counts, key=counts.get) takes the pair seen first, which depends on the order of the text)
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < min_frequency:
            break
        token = tokens[pair[0]] + tokens[pair[1]]
        if token not in ranks:  # else two pairs spell the same bytes: the chunks reuse that token, as tiktoken would
            ranks[token] = len(tokens)
            tokens.append(token)
        chunks = [(merge_pair(ids, pair, ranks[token]), n) for ids, n in chunks]
    return ranks


def train(text_or_paths, vocab_size, pattern='gpt4', special_tokens=(ENDOFTEXT,), min_frequency=1, name='bpe',
          progress=True, chat_template=None):
    """A Tokenizer trained on a str of text, or on a list of paths (text files, .jsonl files, folders).
    vocab_size counts everything: 256 bytes, the merges, and the special tokens (which take the last ids).
    pattern: 'gpt4' (tiktoken's cl100k split, the default), 'gpt2', or any regex. chat_template: the Jinja
    template it keeps (e.g. CHATML_TEMPLATE, with CHATML_TOKENS among the special tokens)."""
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) < len(special_tokens) or not all(isinstance(t, str) and t for t in special_tokens):
        raise BPEError(f"special tokens must be distinct non-empty strings, got {special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise BPEError(f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} "
                       f"special tokens need at least {256 + len(special_tokens)}")
    pattern = PATTERNS.get(pattern, pattern)
    t0 = time.time()
    if isinstance(text_or_paths, str):
        if '\n' not in text_or_paths and os.path.isfile(text_or_paths):
            raise BPEError(f"train() got the str {text_or_paths!r}, which names a file: a str is the text itself; "
                           f"pass [path] to train on the file")
        what, documents = 'the text', [[text_or_paths]]
    else:
        paths = [text_or_paths] if isinstance(text_or_paths, os.PathLike) else list(text_or_paths)
        what, documents = ', '.join(map(os.fspath, paths)), read_documents(list_files(paths))
    counts = count_chunks(documents, pattern, special_tokens)
    if not counts:
        raise BPEError(f"no text to train on in {what}")
    if progress:
        print(f"counted {sum(counts.values()):,} chunks ({len(counts):,} unique) in {time.time() - t0:.1f}s")
    chunk_counts = Counter()  # summed: two chunks with different lone surrogates become the same bytes
    for chunk, n in counts.items():
        chunk_counts[valid_text(chunk).encode('utf-8')] += n
    del counts
    n_tokens = vocab_size - len(special_tokens)
    ranks = train_ranks(chunk_counts, n_tokens, min_frequency, progress)
    if progress:
        if len(ranks) < n_tokens:
            print(f"stopped at {len(ranks) + len(special_tokens):,} tokens, short of vocab_size={vocab_size:,}: "
                  f"no pair left that occurs at least {min_frequency} time(s)")
        print(f"trained in {time.time() - t0:.1f}s")
    return Tokenizer(ranks, pattern, {t: len(ranks) + i for i, t in enumerate(special_tokens)}, name,
                     chat_template=chat_template)

# ----------------------------------------------------------------------------------------------------------
# encoding


def bpe_merge(piece, ranks, merges=None):
    """Ids of one chunk's bytes by tiktoken's rule: merge the adjacent pair whose joined bytes have the lowest
    rank (leftmost among equals) until no joined pair is a token. Given merges {(left, right): priority}, as
    in a tokenizer.json, Hugging Face's rule: only the listed pairs merge, the earliest listed first.

    >>> bpe_merge(b'aaab', {b'a': 0, b'b': 1, b'aa': 2, b'ab': 3})
    [2, 3]
    >>> bpe_merge(b'aaab', {b'a': 0, b'b': 1, b'aa': 2, b'ab': 3}, {(b'a', b'b'): 0})
    [0, 0, 3]
    """
    parts = [piece[i:i + 1] for i in range(len(piece))]
    rank = (lambda a, b: ranks.get(a + b, NONE)) if merges is None else (lambda a, b: merges.get((a, b), NONE))
    while len(parts) > 1:
        best, i = min((rank(parts[j], parts[j + 1]), j) for j in range(len(parts) - 1))
        if best == NONE:  # no joined pair is a token
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


class Tokenizer:
    """Byte-level BPE: ranks {token bytes: id}, a split pattern, and special tokens {text: id}. From a tokenizer.json
    or a GGUF (from_hf, from_gguf) also merges {(left, right): priority}, merged by instead of ranks, and the
    settings in OPTIONAL. SentencePieceBPE below has the same interface."""
    kind = 'bpe'  # the model file's kind line; old files have none
    SETTINGS = OPTIONAL

    def __init__(self, ranks, pattern, special_tokens=None, name='bpe', merges=None, ignore_merges=False,
                 normalizer=None, bos_token=None, eos_token=ENDOFTEXT, chat_template=None, add_bos_token=False):
        self.ranks, self.pattern, self.name = dict(ranks), pattern, name
        # A vocabulary may lack bytes its training text never had (SmolLM2 lacks 21, e.g. 0xC0, never in UTF-8).
        # The tokenizers library drops such a byte from its chunk before merging, and so does encode_ordinary.
        self.missing = bytes(b for b in range(256) if bytes([b]) not in self.ranks)
        self.special_tokens = dict(special_tokens or {})
        self.vocab = {i: t for t, i in self.ranks.items()}  # id -> bytes, for decoding
        self.vocab.update({i: t.encode('utf-8') for t, i in self.special_tokens.items()})
        if len(self.vocab) < len(self.ranks) + len(self.special_tokens):
            raise BPEError(f"tokenizer {name!r} gives two tokens the same id")
        self.vocab_size = max(self.vocab, default=-1) + 1
        self.eot_token = self.special_tokens.get(ENDOFTEXT)
        self.merges, self.ignore_merges, self.normalizer = merges, ignore_merges, normalizer
        check_ids(self)
        check_merges(self, self.ranks)
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.add_bos_token = add_bos_token  # whether the model expects bos_token first (encode never adds it)
        self.bos_token_id, self.eos_token_id = self.token_id(bos_token), self.token_id(eos_token)  # None: none known
        self._split = chunker(pattern)
        self._cache = {}  # chunk -> ids: text repeats its words, so most chunks are merged only once
        self._encoding = None

    def __repr__(self):
        kind, shown = type(self).__name__, f"vocab_size={self.vocab_size}, special_tokens={self.special_tokens}"
        return f"{kind}({self.name!r}, {shown})"

    def token_id(self, text):
        """The id of a special or ordinary token's text, or None."""
        return self.special_tokens.get(text, self.ranks.get(text.encode('utf-8'))) if text else None

    def encode_ordinary(self, text, first=True):
        """Ids of text, special token strings encoded as ordinary text. (first: whether text starts the input; only
        SentencePiece, which may put a space there, cares.)"""
        ids, cache, ranks, missing = [], self._cache, self.ranks, self.missing
        if len(cache) > 200_000:  # bounded memory on long inputs
            cache.clear()
        text = valid_text(text)
        if self.normalizer:  # e.g. Qwen2's NFC: an accent typed as its own character gives the same ids
            text = unicodedata.normalize(self.normalizer, text)
        merges, whole = self.merges, self.merges is None or self.ignore_merges  # tiktoken looks a chunk up whole
        for chunk in self._split(text):
            got = cache.get(chunk)
            if got is None:
                piece = chunk.encode('utf-8')
                if whole and piece in ranks:
                    got = [ranks[piece]]
                else:
                    got = bpe_merge(piece.translate(None, missing) if missing else piece, ranks, merges)
                cache[chunk] = got
            ids += got
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special='all'):
        """Ids of text, with tiktoken's rules for special tokens: the text of one raises ValueError unless it is
        allowed (then it becomes its id; 'all' allows all) or not disallowed (disallowed_special=() encodes
        it as ordinary text)."""
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == 'all' else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == 'all' else set(disallowed_special)
        if disallowed and (m := special_regex(disallowed).search(text)):
            raise BPEError(f"the text contains the special token {m.group()!r}: pass allowed_special={{"
                           f"{m.group()!r}}} (or 'all') to encode it as its id, or disallowed_special=() "
                           f"to encode it as ordinary text")
        text = valid_text(text)
        allowed &= specials
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for m in special_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start:m.start()], start == 0)
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:], start == 0)

    def decode_bytes(self, ids):
        try:
            return b''.join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise BPEError(f"token id {e.args[0]!r} is not in the vocabulary of {self.name!r} "
                           f"(ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids):
        """Text of ids; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD, never an error."""
        return self.decode_bytes(ids).decode('utf-8', errors='replace')

    def apply_chat_template(self, messages, add_generation_prompt=True, **extra):
        """The prompt text of messages [{'role': ..., 'content': ...}] by this tokenizer's chat template, as
        transformers' apply_chat_template(messages, tokenize=False) makes it (see render_chat)."""
        if not self.chat_template:
            raise BPEError(f"tokenizer {self.name!r} has no chat template: render one with "
                           f"bpe.render_chat(template, messages)")
        tokens = {'bos_token': self.bos_token, 'eos_token': self.eos_token}
        return render_chat(self.chat_template, messages, add_generation_prompt, **{**tokens, **extra})

    # ------------------------------------------------------------------------------------------------------
    # files and tiktoken

    def dumps(self):
        """The readable model file's text: a header, then one line per token in id (= merge) order, as the
        id and the token as a JSON string (or, when its bytes are not UTF-8, a JSON list of byte values).
        From a tokenizer.json, its settings (OPTIONAL) and merges too: 'merge left_id right_id', in its order."""
        lines = self._head() + [f'pattern {json.dumps(self.pattern)}'] + self._settings()
        for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            try:
                shown = json.dumps(token.decode('utf-8'), ensure_ascii=False)
            except UnicodeDecodeError:
                shown = json.dumps(list(token))
            lines.append(f'{i} {shown}')
        return '\n'.join(lines + self._merge_lines(self.ranks)) + '\n'

    def _head(self):
        kind = [f'kind {json.dumps(self.kind)}'] if self.kind != 'bpe' else []  # old readers: no kind line
        return [FILE_HEADER, f'name {json.dumps(self.name)}'] + kind

    def _settings(self):
        """The 'key value' lines of the settings that differ from their defaults, then the special tokens."""
        lines = [f'{key} {json.dumps(getattr(self, key))}' for key, default in self.SETTINGS.items()
                 if getattr(self, key) != default]
        return lines + [f'special {i} {json.dumps(t)}' for t, i in self.special_tokens.items()]

    def _merge_lines(self, ids):
        return [f'merge {ids[a]} {ids[b]}' for a, b in sorted(self.merges, key=self.merges.get)] if self.merges else []

    def save(self, path):
        """Write dumps() to path."""
        path = os.fspath(path)
        with open(path + '.tmp', 'w', encoding='utf-8', newline='\n') as f:
            f.write(self.dumps())
        os.replace(path + '.tmp', path)  # never a half-written model file

    @classmethod
    def load(cls, path):
        """The Tokenizer saved at path by save()."""
        if not os.path.isfile(path):
            raise BPEError(f"tokenizer file {path} not found (write one with: python bpe.py --input=... --out={path})")
        with open(path, 'rb') as f:
            raw = f.read()
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError:
            raise BPEError(f"{path} is not a bpe.py tokenizer file (it is not UTF-8 text)") from None
        return cls.loads(text, where=path)

    @classmethod
    def loads(cls, text, where='the tokenizer text'):
        """The Tokenizer (or SentencePieceBPE, as its kind line says) whose dumps() is text; where names it in
        error messages."""
        fields, specials, tokens, merges = read_model_file(text, where)
        kind = fields.pop('kind', 'bpe')
        if kind not in KINDS:
            raise BPEError(f"{where} holds a tokenizer of kind {kind!r}, which this bpe.py does not know "
                           f"(known: {', '.join(KINDS)}); update bpe.py")
        if (missing := next((i for pair in merges for i in pair if i not in tokens), None)) is not None:
            raise BPEError(f"{where} is damaged: a merge names token {missing}, which it does not have")
        return KINDS[kind].from_parts(fields, specials, tokens, merges, where)

    @classmethod
    def from_parts(cls, fields, specials, tokens, merges, where):
        """loads' pieces -> a Tokenizer: tokens {id: (JSON value, score)}, merges [(left id, right id)]."""
        if 'pattern' not in fields:
            raise BPEError(f"{where} has no pattern line")
        vocab = {i: t.encode('utf-8') if isinstance(t, str) else bytes(t) for i, (t, _) in tokens.items()}
        if len(ranks := {t: i for i, t in vocab.items()}) < len(vocab):
            raise BPEError(f"{where} is damaged: two ids have the same token")
        merges = {(vocab[a], vocab[b]): n for n, (a, b) in enumerate(merges)}
        return built(where, cls, ranks, fields['pattern'], specials, fields.get('name', 'bpe'), merges or None,
                     **{key: fields[key] for key in cls.SETTINGS if key in fields})

    def to_tiktoken(self):
        """A tiktoken.Encoding with identical ids (built once, then reused). It merges by id, so from a tokenizer.json
        only if its ids follow its merges (GPT-2, Llama 3, Qwen2, SmolLM do). It does not normalize (Qwen2: NFC)."""
        if self._encoding is None:
            order = sorted(self.merges or (), key=lambda pair: self.merges[pair])  # HF's merges, in priority order
            if any(self.ranks[a + b] > self.ranks[c + d] for (a, b), (c, d) in zip(order, order[1:])):
                raise BPEError(f"tokenizer {self.name!r} numbers its tokens out of merge order, which tiktoken "
                               f"cannot follow (it merges by id): use encode() instead")
            self._encoding = tiktoken_class(self)(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                                  special_tokens=self.special_tokens)
        return self._encoding

    def save_tiktoken(self, path):
        """Write the ranks as a .tiktoken file (base64 token, rank), the format tiktoken.load reads."""
        with open(path, 'w', encoding='ascii') as f:
            for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                f.write(f'{base64.b64encode(token).decode()} {i}\n')

    @classmethod
    def from_hf(cls, path):
        """A Tokenizer from a Hugging Face tokenizer.json, the file or its folder: byte-level BPE (GPT-2, Llama 3,
        Qwen2, SmolLM), or a SentencePieceBPE for SentencePiece-style BPE with byte fallback (Llama 2, Mistral).
        The ids of the `tokenizers` library's encode(text, add_special_tokens=False), its added tokens (special
        or not) our special tokens. tokenizer_config.json beside it names bos and eos and has the chat_template.
        Other tokenizers raise a BPEError that says why."""
        file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else os.fspath(path)
        settings = built(file, hf_settings, file)
        return built(file, KINDS[settings.pop('kind')], **settings)

    @classmethod
    def from_gguf(cls, meta, where='the GGUF metadata'):
        """A Tokenizer (tokenizer.ggml.model 'gpt2') or SentencePieceBPE ('llama') from a GGUF file's metadata
        {key: value}, as llama.cpp reads its tokenizer.ggml.* keys, with tokenizer.chat_template; where (the
        file's path, say) names it in error messages."""
        settings = built(where, gguf_settings, meta)
        return built(where, KINDS[settings.pop('kind')], **settings)

    @classmethod
    def from_tiktoken(cls, name_or_encoding):
        """A Tokenizer from a tiktoken.Encoding or an encoding name ('gpt2', 'cl100k_base'). tiktoken downloads
        its files once; offline, point TIKTOKEN_CACHE_DIR to a folder that holds them."""
        enc = name_or_encoding
        if isinstance(enc, str):
            import tiktoken
            try:
                enc = tiktoken.get_encoding(enc)
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise BPEError(f"could not load tiktoken's {name_or_encoding!r} ({reason}); known: "
                               f"{', '.join(tiktoken.list_encoding_names())}; offline, set TIKTOKEN_CACHE_DIR "
                               f"to a folder of its files") from None
        # tiktoken has no public accessor for these; the attribute names have been stable since its release
        return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens, enc.name)


def built(where, make, *args, **kwargs):
    """make(*args, **kwargs), with its BPEError said of where the input comes from, unless it names it already."""
    try:
        return make(*args, **kwargs)
    except BPEError as e:
        raise BPEError(str(e) if where in str(e) else f"{where}: {e}") from None


def check_ids(tok):
    """BPEError unless tok's ids run from 0 to below MAX_ID with few gaps: a model sized by a stray huge id would
    allocate an embedding of that many rows."""
    if tok.vocab and not (min(tok.vocab) >= 0 and tok.vocab_size <= min(MAX_ID, 2 * len(tok.vocab) + 1024)):
        raise BPEError(f"tokenizer {tok.name!r} has ids {min(tok.vocab)}..{tok.vocab_size - 1} for "
                       f"{len(tok.vocab)} tokens: ids run from 0 with few gaps, below 2**31")


def check_merges(tok, vocab):
    """BPEError unless each of tok's merges joins two tokens of vocab into a third, as the tokenizers library
    demands: encode looks up what a merge makes, and dumps writes a merge as its tokens' ids."""
    if bad := next((p for p in tok.merges or () if not (p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab)),
                   None):
        raise BPEError(f"tokenizer {tok.name!r} has a merge {bad!r:.60} whose tokens are not all in its vocabulary")


def tiktoken_class(tok):
    """tiktoken.Encoding, or for a vocabulary that lacks some bytes a subclass that hands text holding one to tok:
    tiktoken cannot drop a byte as the tokenizers library does, and all other text it encodes alike, fast."""
    import tiktoken
    if not tok.missing:
        return tiktoken.Encoding

    def lacks(text):
        data = valid_text(text).encode('utf-8')
        return len(data.translate(None, tok.missing)) < len(data)

    class Encoding(tiktoken.Encoding):  # encode_batch and encode_ordinary_batch call these two
        def encode_ordinary(self, text):
            return tok.encode_ordinary(text) if lacks(text) else super().encode_ordinary(text)

        def encode(self, text, **kw):
            return tok.encode(text, **kw) if lacks(text) else super().encode(text, **kw)
    return Encoding


def read_model_file(text, where):
    """A model file's ({key: value}, special tokens {text: id}, tokens {id: (JSON value, score or None)},
    merges [(left id, right id)]); lines: 'key JSON', 'special id JSON', 'id JSON [score]', 'merge id id'. Each
    line's types and ranges are checked here, so that a damaged file is refused naming its line."""
    fields, specials, tokens, merges = {}, {}, {}, []
    lines = text.split('\n')
    if lines[0] != FILE_HEADER:
        raise BPEError(f"{where} is not a bpe.py tokenizer file (its first line is not {FILE_HEADER!r})")
    read_json_value = json.JSONDecoder().raw_decode
    for n, line in enumerate(lines[1:], 2):
        if not line and n == len(lines):  # the final newline
            break
        key, _, value = line.partition(' ')
        try:  # (a BPEError raised here says what is wrong; any other ValueError is a line not in dumps' form)
            if key.isdigit():
                token, end = read_json_value(value)
                if not (isinstance(token, str) or isinstance(token, list) and all(map(is_byte, token))):
                    raise BPEError('a token is a JSON string or a list of byte values')
                score = float(value[end:]) if value[end:].strip() else None
                if score is not None and not math.isfinite(score):
                    raise BPEError(f'the score {score} is not a finite number')
                if (i := token_id_of(key)) in tokens:
                    raise BPEError(f'id {i} has a line already')
                tokens[i] = valid_json(token), score
            elif key == 'merge':
                a, b = value.split(' ')
                merges.append((token_id_of(a), token_id_of(b)))
            elif key == 'special':
                i, _, name = value.partition(' ')
                if not isinstance(name := valid_json(json.loads(name)), str) or not name:
                    raise BPEError('a special token is a non-empty JSON string')
                if name in specials:
                    raise BPEError(f'special token {name[:40]!r} has a line already')
                specials[name] = token_id_of(i)
            else:
                if not key.isidentifier():  # (a setting this bpe.py does not know is skipped, but has a name)
                    raise BPEError(f'{key[:20]!r} is no id, setting, special or merge')
                if key in fields:
                    raise BPEError(f'{key} has a line already')
                fields[key] = valid_json(json.loads(value))
                check_setting(key, fields[key])
        except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deeply to read
            why = f" ({e})" if isinstance(e, BPEError) else ''
            raise BPEError(f"{where}:{n} is damaged{why}: {line[:80]!r}") from None
    return fields, specials, tokens, merges


MAX_ID = 2 ** 31  # ids are int32 to tiktoken, llama.cpp and the models' embeddings


def token_id_of(text):
    """The id a model file spells as text: decimal digits only (int() would take ' 7', '٧' and '1_0'), < MAX_ID."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < MAX_ID):
        raise BPEError(f"{text[:20]!r} is not an id (0 to 2**31 - 1)")
    return int(text)


def is_byte(value):
    return type(value) is int and 0 <= value < 256  # type: JSON's true is no byte


def valid_json(value):
    """value, if its text (a str, or each str a list holds) is UTF-8 text; a lone surrogate ("\\ud800") is not."""
    for s in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
        if isinstance(s, str):
            s.encode('utf-8')  # a UnicodeEncodeError is a ValueError: the line is damaged
    return value


def check_setting(key, value):
    """BPEError unless value is of the type the model file's setting key has (a key this bpe.py does not know
    passes: newer files may have settings it can ignore); the pattern must be a regex."""
    defaults = {**OPTIONAL, **SentencePieceBPE.SETTINGS}
    if key in ('name', 'kind', 'pattern') and not isinstance(value, str):
        raise BPEError(f'{key} is not a JSON string')
    if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
        raise BPEError(f'{key} is not true or false')
    if key in defaults and not isinstance(defaults[key], bool) and not (value is None or isinstance(value, str)):
        raise BPEError(f'{key} is not a JSON string or null')
    if key == 'normalizer' and value not in NORMALIZERS:
        raise BPEError(f"normalizer {value!r} is not one of {', '.join(map(str, NORMALIZERS))}")
    if key == 'prepend_scheme' and value not in PREPEND_SCHEMES:
        raise BPEError(f"prepend_scheme {value!r} is not one of {', '.join(PREPEND_SCHEMES)}")
    if key == 'pattern':
        chunker(value)


NORMALIZERS = (None, 'NFC', 'NFD', 'NFKC', 'NFKD')  # those unicodedata does exactly as Hugging Face's

# ----------------------------------------------------------------------------------------------------------
# SentencePiece-style BPE (Llama 2, TinyLlama, Mistral): characters, not bytes, with '▁' for a space

SPACE = '\u2581'  # ▁
BYTE_PIECE = regex.compile(r'<0x([0-9A-F]{2})>')  # the byte-fallback pieces, <0x00> .. <0xFF>
# where a '▁' goes before a text (each run of it between special tokens): 'legacy' always (llama.cpp's
# add_space_prefix, HF's Prepend normalizer), HF's Metaspace 'always' unless the text starts with a space, 'first'
# likewise but only at the start of the input, 'never'
PREPEND_SCHEMES = ('legacy', 'always', 'first', 'never')


def merge_symbols(parts, rank):
    """parts (strings) merged pair by pair: always the adjacent pair of lowest rank(left, right) (None: never),
    the leftmost of equals, as Hugging Face's BPE and llama.cpp's SentencePiece do. A heap of candidate pairs
    keeps this fast on the long words SentencePiece makes (a whole line can be one).

    >>> merge_symbols(list('aaab'), {('a', 'a'): 0, ('a', 'b'): 1, ('aa', 'ab'): 2}.get)
    ['aaab']
    """
    parts, heap = list(parts), []
    after = list(range(1, len(parts))) + [-1]  # a linked list: merged-away parts become None
    before = list(range(-1, len(parts) - 1))

    def push(i, j):
        if (r := rank(parts[i], parts[j])) is not None:
            heapq.heappush(heap, (r, i, j, parts[i] + parts[j]))
    for i in range(len(parts) - 1):
        push(i, i + 1)
    while heap:
        _, i, j, joined = heapq.heappop(heap)
        if parts[i] is None or after[i] != j or parts[i] + parts[j] != joined:
            continue  # outdated: one of the two has been merged since
        parts[i], parts[j] = joined, None
        after[i] = after[j]
        if after[i] != -1:
            before[after[i]] = i
            push(i, after[i])
        if before[i] != -1:
            push(before[i], i)
    return [p for p in parts if p is not None]


def piece_bytes(piece):
    """What a piece decodes to: '▁' is a space, <0x41> the byte 0x41."""
    m = BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace(SPACE, ' ').encode('utf-8')


class SentencePieceBPE(Tokenizer):
    """SentencePiece-style BPE: tokens {id: piece} where a piece is characters with '▁' for a space, and
    special tokens {text: id}. Merged by a Hugging Face merge list {(left, right): priority}, or by scores {id:
    score} as llama.cpp does from a GGUF: the adjacent pair that spells the best-scored piece. A character with no
    piece becomes the pieces of its UTF-8 bytes (<0xE4><0xBD><0xA0>), or unk_token where those are missing."""
    kind = 'sentencepiece'
    SETTINGS = {'unk_token': None, 'bos_token': None, 'eos_token': None, 'prepend_scheme': 'legacy', 'split': False,
                'add_bos_token': True, 'chat_template': None}

    def __init__(self, tokens, special_tokens=None, name='sentencepiece', merges=None, scores=None, unk_token=None,
                 bos_token=None, eos_token=None, prepend_scheme='legacy', split=False, add_bos_token=True,
                 chat_template=None):
        if prepend_scheme not in PREPEND_SCHEMES:
            raise BPEError(f"prepend_scheme must be one of {', '.join(PREPEND_SCHEMES)}, not {prepend_scheme!r}")
        self.tokens, self.name = dict(tokens), name
        self.pieces = {}  # piece -> id, the first id of a piece a vocabulary holds twice
        for i, piece in sorted(self.tokens.items()):
            self.pieces.setdefault(piece, i)
        self.special_tokens = dict(special_tokens or {})
        self.vocab = {i: piece_bytes(p) for i, p in self.tokens.items()}
        self.vocab.update({i: t.encode('utf-8') for t, i in self.special_tokens.items()})
        if len(self.vocab) < len(self.tokens) + len(self.special_tokens):
            raise BPEError(f"tokenizer {name!r} gives two tokens the same id")
        self.vocab_size = max(self.vocab, default=-1) + 1
        self.merges, self.scores = merges, None if merges is not None else dict(scores or {})
        check_ids(self)
        check_merges(self, self.pieces)
        self.byte_pieces = {piece_bytes(p)[0]: p for p in self.pieces if BYTE_PIECE.fullmatch(p)}
        self.prepend_scheme, self.split, self.add_bos_token = prepend_scheme, split, add_bos_token
        self.unk_token, self.bos_token, self.eos_token = unk_token, bos_token, eos_token
        self.chat_template = chat_template
        self.unk_token_id = self.token_id(unk_token)
        self.bos_token_id, self.eos_token_id = self.token_id(bos_token), self.token_id(eos_token)
        self.eot_token = self.special_tokens.get(ENDOFTEXT)
        self.normalizer, self.pattern, self.missing = None, None, b''
        self._cache = {}

    def token_id(self, text):
        return self.special_tokens.get(text, self.pieces.get(text)) if text else None

    def encode_ordinary(self, text, first=True):
        """Ids of text, special token strings encoded as ordinary text; first: whether text starts the input
        (prepend_scheme 'first' puts a '▁' only there)."""
        text = valid_text(text).replace(' ', SPACE)
        if not text:
            return []
        scheme = self.prepend_scheme
        if scheme == 'legacy' or (scheme == 'always' or scheme == 'first' and first) and text[0] != SPACE:
            text = SPACE + text
        if len(self._cache) > 200_000:
            self._cache.clear()
        ids = []
        for word in regex.findall(f'{SPACE}[^{SPACE}]*|[^{SPACE}]+', text) if self.split else [text]:
            got = self._cache.get(word)
            if got is None:
                got = self._encode_word(word)
                if len(word) < 100:  # a short word will come again; a line will not
                    self._cache[word] = got
            ids += got
        return ids

    def _encode_word(self, word):
        pieces = self.pieces
        if self.merges is not None:  # Hugging Face: a character without a piece is its bytes from the start
            parts = [p for ch in word for p in ([ch] if ch in pieces else self._fallback(ch))]
            parts = merge_symbols(parts, lambda a, b: self.merges.get((a, b)))
        else:  # llama.cpp: characters merge by the score of the piece they spell; one left alone becomes bytes
            scores = self.scores
            parts = merge_symbols(word, lambda a, b: -scores.get(pieces[a + b], 0.0) if a + b in pieces else None)
            parts = [p for part in parts for p in ([part] if part in pieces else self._fallback(part))]
        ids = [pieces.get(p, self.unk_token_id) for p in parts]
        # runs of the unknown token are one, as in Llama 2's tokenizer.json (fuse_unk)
        return [i for n, i in enumerate(ids) if i != self.unk_token_id or not n or ids[n - 1] != i]

    def _fallback(self, char):
        """The byte pieces of a character without a piece; else the unknown token, else nothing (dropped)."""
        data = char.encode('utf-8')
        if all(b in self.byte_pieces for b in data):
            return [self.byte_pieces[b] for b in data]
        return [self.unk_token] if self.unk_token_id is not None else []

    def decode_bytes(self, ids):
        """The bytes of ids; the space that the encoder put before the text is taken off again."""
        data = super().decode_bytes(ids)
        return data[1:] if self.prepend_scheme != 'never' and data[:1] == b' ' else data

    def dumps(self):
        """The model file's text: as Tokenizer.dumps, with pieces for tokens, and a score after each when merged by
        scores (a GGUF's)."""
        lines = self._head() + self._settings()
        for i, piece in sorted(self.tokens.items()):
            score = f' {self.scores.get(i, 0.0)!r}' if self.scores is not None else ''
            lines.append(f'{i} {json.dumps(piece, ensure_ascii=False)}{score}')
        return '\n'.join(lines + self._merge_lines(self.pieces)) + '\n'

    @classmethod
    def from_parts(cls, fields, specials, tokens, merges, where):
        if any(not isinstance(t, str) for t, _ in tokens.values()):
            raise BPEError(f"{where} is damaged: a SentencePiece token is not text")
        pieces = {i: t for i, (t, _) in tokens.items()}
        scores = {i: s for i, (_, s) in tokens.items() if s is not None}
        return built(where, cls, pieces, specials, fields.get('name', 'sentencepiece'),
                     {(pieces[a], pieces[b]): n for n, (a, b) in enumerate(merges)} if merges else None, scores,
                     **{key: fields[key] for key in cls.SETTINGS if key in fields})

    def to_tiktoken(self):
        raise BPEError(f"tokenizer {self.name!r} is SentencePiece-style BPE, which tiktoken cannot run (it merges "
                       f"bytes, not characters): use encode() instead")

    def save_tiktoken(self, path):
        self.to_tiktoken()

    def gguf_metadata(self, vocab_size):
        """The tokenizer.* metadata of a GGUF file (tokenizer.ggml.model 'llama'), padded to the model's vocab_size
        with unused tokens. From a merge list, a piece scores minus the priority of the first merge that makes it."""
        if self.vocab_size > vocab_size:
            raise BPEError(f"tokenizer {self.name!r} has ids up to {self.vocab_size - 1}, beyond the model's "
                           f"vocab_size {vocab_size}")
        scores = self.scores
        if scores is None:
            made = {}
            for (a, b), n in sorted(self.merges.items(), key=lambda kv: kv[1]):
                made.setdefault(a + b, n)
            scores = {i: -float(made.get(p, len(self.merges))) for i, p in self.tokens.items()}
        tokens, types, values = [f'[PAD{i}]' for i in range(vocab_size)], [5] * vocab_size, [-1e9] * vocab_size
        for i, piece in self.tokens.items():  # 1 normal, 6 byte, 2 unknown, 3 control, 5 unused
            tokens[i], types[i], values[i] = piece, 6 if BYTE_PIECE.fullmatch(piece) else 1, scores.get(i, 0.0)
        for text, i in self.special_tokens.items():
            tokens[i], types[i], values[i] = text, 2 if text == self.unk_token else 3, 0.0
        meta = {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': tokens, 'tokenizer.ggml.scores': values,
                'tokenizer.ggml.token_type': types, 'tokenizer.ggml.add_bos_token': bool(self.add_bos_token),
                'tokenizer.ggml.add_space_prefix': self.prepend_scheme != 'never'}
        for key, i in (('bos', self.bos_token_id), ('eos', self.eos_token_id), ('unknown', self.unk_token_id)):
            if i is not None:
                meta[f'tokenizer.ggml.{key}_token_id'] = i
        if self.chat_template:
            meta['tokenizer.chat_template'] = self.chat_template
        return meta


KINDS = {'bpe': Tokenizer, 'sentencepiece': SentencePieceBPE}  # a model file's kind -> its class

# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) or SentencePiece-style BPE (Llama 2)

SENTENCEPIECE = 'SentencePiece, e.g. Llama 2 / TinyLlama / Mistral'
HINTS = {'Metaspace': SENTENCEPIECE, 'byte_fallback': SENTENCEPIECE, 'Unigram': 'SentencePiece, e.g. T5 / ALBERT',
         'WordPiece': 'e.g. BERT'}  # the models users know these by
# SmolLM's Digits(individual_digits) then GPT-2's regex, as one regex: each digit is a chunk, and the regex
# sees the text before a digit as ending there (`(?!\S)` becomes "followed by a space, a digit or the end")
GPT2_DIGITS_PATTERN = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++(?=\p{N}|$)"""
                       r"""|\s+(?![^\s\p{N}])|\s""")


def unsupported(what, why=''):
    hint = next((f' ({h})' for key, h in HINTS.items() if key in what), '')
    what = what if len(what) <= 200 else what[:200] + '...'  # (it may quote the file's JSON)
    return BPEError(f"tokenizer.json uses {what}{hint}{why}, which bpe.py does not support; byte-level BPE models "
                    f"(GPT-2, Llama 3, Qwen2, SmolLM) load, and SentencePiece-style BPE with byte_fallback "
                    f"(Llama 2, Mistral)")


def byte_chars():
    """{character: byte}: the printable stand-ins that GPT-2's byte-level BPE writes tokens in ('Ġ' is a space)."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]  # printable: themselves
    hidden = [b for b in range(256) if b not in shown]              # the rest: characters 256, 257, ...
    return {chr(c): b for b, c in zip(shown + hidden, shown + list(range(256, 256 + len(hidden))))}


def isolated(pattern):
    """pattern, plus the text between its matches as chunks too: HF's Split(behavior='Isolated') keeps that
    text, where tiktoken drops it (patterns that match every character, like Llama 3's, leave none)."""
    return f'(?:{pattern})|(?s:.)+?(?=(?:{pattern})|(?!(?s:.)))'


def hf_pattern(spec):
    """The one split regex that does what a tokenizer.json's pre_tokenizer does, or BPEError. Byte-level BPE
    ends in ByteLevel (which splits by GPT-2's regex unless use_regex is false); before it may come a Split
    regex (Llama 3, Qwen2) or Digits (SmolLM)."""
    parts, regexes = spec.get('pretokenizers', [spec]) if spec else [], []
    for part in parts:
        kind, pattern = part.get('type'), part.get('pattern') or {}
        if kind == 'ByteLevel' and part.get('add_prefix_space'):
            raise unsupported("ByteLevel with add_prefix_space (a space put before the text)")
        elif kind == 'ByteLevel' and part.get('use_regex', True):
            regexes.append(GPT2_SPLIT_PATTERN)  # tiktoken's form of HF's regex: the same chunks
        elif kind == 'Split' and part.get('behavior') == 'Isolated' and not part.get('invert'):
            regexes.append(isolated(pattern['Regex'] if 'Regex' in pattern else regex.escape(pattern.get('String'))))
        elif kind == 'Digits':
            regexes.append(isolated(r'\p{N}' if part.get('individual_digits') else r'\p{N}+'))
        elif kind != 'ByteLevel':
            raise unsupported(f"the {kind} pre-tokenizer" + (f" {json.dumps(part)}" if kind == 'Split' else ''))
    kinds = [part.get('type') for part in parts]
    if kinds[-1:] != ['ByteLevel'] or kinds.count('ByteLevel') > 1:
        raise unsupported(f"the pre-tokenizer {'+'.join(map(str, kinds)) or 'null'}, not ending in ByteLevel")
    if regexes == [isolated(r'\p{N}'), GPT2_SPLIT_PATTERN]:
        return GPT2_DIGITS_PATTERN
    if len(regexes) > 1:
        raise unsupported(f"the pre-tokenizers {' then '.join(kinds)}, which bpe.py cannot write as one regex")
    return regexes[0] if regexes else r'(?s).+'


def read_json(path):
    """The JSON object in the file at path: UTF-8 throughout, as the tokenizers library reads it (which refuses
    a lone surrogate such as "\\ud800", and so does the encode() below)."""
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
        json.dumps(value, ensure_ascii=False).encode('utf-8')
    except RecursionError:
        raise BPEError(f"{path} is not JSON bpe.py reads (it is nested too deeply)") from None
    except ValueError as e:
        raise BPEError(f"{path} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise BPEError(f"{path} is not a JSON object (it is a {type(value).__name__})")
    return value


def hf_check(hf, config, file, config_file):
    """BPEError unless what bpe.py reads of a tokenizer.json (hf) and its tokenizer_config.json (config) has the
    JSON types of the format and ids in range: the code after this indexes them without a second look."""
    def need(ok, what, where=file):
        if not ok:
            raise BPEError(f"{where} is damaged: {what}")
    is_id = lambda i: type(i) is int and 0 <= i < MAX_ID  # noqa: E731
    objects = lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)  # noqa: E731
    text = lambda v: v is None or isinstance(v, str)  # noqa: E731
    get = lambda tree, key, default: default if tree.get(key) is None else tree[key]  # noqa: E731  (null: none)
    need(isinstance(model := get(hf, 'model', {}), dict), 'its model is not a JSON object')
    need(isinstance(kind := get(model, 'type', 'BPE'), str), 'its model type is not a string')
    bpe_model = kind == 'BPE'  # (another model, which is refused as unsupported, has other fields)
    need(not bpe_model or isinstance(vocab := get(model, 'vocab', {}), dict) and all(map(is_id, vocab.values())),
         'its vocab is not {token: id} with ids 0 to 2**31 - 1')
    need(not bpe_model or isinstance(merges := get(model, 'merges', []), list) and all(
        isinstance(m, str) or isinstance(m, list) and all(isinstance(p, str) for p in m) for m in merges),
        'its merges are not "left right" strings or [left, right] lists')
    need(not bpe_model or text(model.get('unk_token')), 'its unk_token is not a string')
    need(objects(added := get(hf, 'added_tokens', [])) and all(
        isinstance(t.get('content'), str) and t['content'] and is_id(t.get('id')) for t in added),
        'its added_tokens are not objects {"content": non-empty text, "id": 0 to 2**31 - 1}')
    for key, inner in (('pre_tokenizer', 'pretokenizers'), ('normalizer', 'normalizers'), ('decoder', 'decoders')):
        part = get(hf, key, {})
        parts = part.get(inner, [part]) if isinstance(part, dict) else None
        need(objects(parts) and all(text(p.get('type')) and isinstance(pattern := p.get('pattern', {}), dict)
                                    and all(isinstance(v, str) for v in pattern.values())
                                    and (p.get('type') != 'Split' or {'Regex', 'String'} & pattern.keys())
                                    for p in parts), f'its {key} is not of the form the tokenizers library writes')
    name = lambda t: t.get('content') if isinstance(t, dict) else t  # noqa: E731  (as hf_config reads them)
    template = config.get('chat_template')
    need(text(name(config.get('bos_token'))) and text(name(config.get('eos_token'))) and (
        text(template) or objects(template) and all(text(t.get('name')) and text(t.get('template')) for t in template)),
        'its bos_token, eos_token or chat_template is not text', config_file)


def hf_settings(file):
    """The class's arguments (kind: a key of KINDS) from a tokenizer.json file and the tokenizer_config.json beside
    it: byte-level BPE, or SentencePiece-style BPE (hf_sentencepiece)."""
    if not os.path.isfile(file):
        raise BPEError(f"{file} not found (from_hf takes a tokenizer.json file or the folder that holds it)")
    hf, folder = read_json(file), os.path.dirname(file)
    model, config_file = hf.get('model') or {}, os.path.join(folder, 'tokenizer_config.json')
    config = read_json(config_file) if os.path.isfile(config_file) else {}
    hf_check(hf, config, file, config_file)
    if model.get('type', 'BPE') != 'BPE':
        raise unsupported(f"the {model['type']} model")
    if bad := [k for k in ('continuing_subword_prefix', 'end_of_word_suffix', 'dropout') if model.get(k)]:
        raise unsupported(f"{bad[0]}={model[bad[0]]!r:.40}")
    added = hf.get('added_tokens') or []
    if strip := [t['content'] for t in added if t.get('lstrip') or t.get('rstrip') or t.get('single_word')]:
        raise unsupported(f"the added token {strip[0]!r} with lstrip, rstrip or single_word")
    added = {t['content']: t['id'] for t in added}
    spacing = json.dumps([hf.get('pre_tokenizer'), hf.get('normalizer')], ensure_ascii=False)
    if model.get('byte_fallback') or 'Metaspace' in spacing or SPACE in spacing:  # SentencePiece's marks
        return hf_sentencepiece(hf, added, file, hf_config(config, folder, eos_token=None,
                                                           add_bos_token=hf_adds_bos(hf, True)))
    normalizer = hf.get('normalizer') or {}  # none, one, or a Sequence of them
    normalizers = [n.get('type') for n in normalizer.get('normalizers', [normalizer]) if n]
    if normalizers not in ([], ['NFC'], ['NFD'], ['NFKC'], ['NFKD']):  # these unicodedata does exactly
        raise unsupported(f"the normalizer {'+'.join(map(str, normalizers))}")
    pattern, chars = hf_pattern(hf.get('pre_tokenizer')), byte_chars()
    if (hf.get('decoder') or {}).get('type') != 'ByteLevel':
        raise unsupported(f"the {(hf.get('decoder') or {}).get('type')} decoder")
    try:  # tokens are written in GPT-2's byte characters; added tokens are plain text, with their own ids
        ranks = {bytes(chars[c] for c in t): i for t, i in (model.get('vocab') or {}).items() if t not in added}
        merges = {(bytes(chars[c] for c in a), bytes(chars[c] for c in b)): n
                  for n, (a, b) in enumerate(hf_merges(model, file))}
    except KeyError as e:
        raise BPEError(f"{file} is not byte-level BPE: a token has the character {e.args[0]!r}") from None
    return dict(kind='bpe', ranks=ranks, pattern=pattern, special_tokens=added, merges=merges,
                normalizer=normalizers[0] if normalizers else None, ignore_merges=bool(model.get('ignore_merges')),
                **hf_config(config, folder, eos_token=ENDOFTEXT, add_bos_token=hf_adds_bos(hf, False)))


def hf_adds_bos(hf, default):
    """Whether tokenizer.json's post-processor puts a special token before the text (Llama 2's and Llama 3's
    TemplateProcessing does): what transformers then adds, when tokenizer_config.json does not say."""
    post = hf.get('post_processor') or {}
    for step in post.get('processors', [post]) if isinstance(post, dict) else []:
        if isinstance(step, dict) and step.get('type') == 'TemplateProcessing':
            single = step.get('single') or []
            return bool(single) and isinstance(single[0], dict) and 'SpecialToken' in single[0]
    return default


def hf_merges(model, file):
    """A tokenizer.json's merges as pairs; newer files write them as lists, older as 'left right' strings."""
    pairs = [m.split(' ') if isinstance(m, str) else m for m in model.get('merges') or []]
    if any(len(pair) != 2 for pair in pairs):
        raise BPEError(f"{file} has a merge that is not two tokens")
    if not pairs:  # (a model file could not tell this from a tokenizer merged by ranks or scores)
        raise BPEError(f"{file} has no merges, which BPE merges by")
    return pairs


def hf_config(config, folder, eos_token, add_bos_token):
    """The settings tokenizer_config.json holds (the defaults where it has none): bos, eos, the chat template."""
    name = lambda t: t.get('content') if isinstance(t, dict) else t  # "<s>" or {"content": "<s>", ...}
    template = config.get('chat_template')
    if isinstance(template, list):  # older files: named templates
        template = {t.get('name'): t.get('template') for t in template}.get('default')
    return dict(bos_token=name(config.get('bos_token')), eos_token=name(config.get('eos_token', eos_token)),
                add_bos_token=bool(config.get('add_bos_token', add_bos_token)), chat_template=template,
                name=os.path.basename(os.path.abspath(folder)) or 'hf')


def hf_sentencepiece(hf, added, file, settings):
    """SentencePieceBPE's arguments from a tokenizer.json of the shape Llama 2's has: BPE with byte_fallback, spaces
    made '▁' by a Metaspace pre-tokenizer or by the older normalizers Prepend('▁') + Replace(' ', '▁'), and a
    decoder of Replace, ByteFallback, Fuse and Strip (or Metaspace)."""
    model, pre = hf.get('model') or {}, hf.get('pre_tokenizer') or {}
    normalizer = hf.get('normalizer') or {}
    normalizers = [n for n in normalizer.get('normalizers', [normalizer]) if n]
    if pre and (pre.get('type') != 'Metaspace' or pre.get('replacement', SPACE) != SPACE):
        raise unsupported(f"the pre-tokenizer {json.dumps(pre)} with SentencePiece-style BPE")
    if not model.get('byte_fallback'):
        raise unsupported('the Metaspace pre-tokenizer' if pre else "a Replace(' ', '▁') normalizer",
                          why=' without byte_fallback')
    if model.get('ignore_merges'):
        raise unsupported("ignore_merges with byte_fallback")
    if any(n not in SPM_NORMALIZERS for n in normalizers) or pre and normalizers:
        raise unsupported(f"the normalizer {json.dumps(normalizer)} with SentencePiece-style BPE")
    kinds = {n['type'] for n in normalizers}
    if pre:  # older files say add_prefix_space instead of prepend_scheme, and always split
        scheme = pre.get('prepend_scheme') or ('always' if pre.get('add_prefix_space', True) else 'never')
        split = bool(pre.get('split', True))
    elif 'Replace' in kinds:
        scheme, split = 'legacy' if 'Prepend' in kinds else 'never', False
    else:
        raise unsupported('byte_fallback=True', why=" without '▁' for spaces (a Metaspace pre-tokenizer or a "
                                                    "Replace(' ', '▁') normalizer)")
    decoder = hf.get('decoder') or {}
    if bad := [d.get('type') for d in decoder.get('decoders', [decoder]) if d.get('type') not in SPM_DECODERS]:
        raise unsupported(f"the {bad[0]} decoder with SentencePiece-style BPE")
    tokens = {i: t for t, i in (model.get('vocab') or {}).items() if t not in added}
    merges = {(a, b): n for n, (a, b) in enumerate(hf_merges(model, file))}
    return dict(kind='sentencepiece', tokens=tokens, special_tokens=added, merges=merges,
                unk_token=model.get('unk_token'), prepend_scheme=scheme, split=split, **settings)


SPM_NORMALIZERS = [{'type': 'Prepend', 'prepend': SPACE}, {'type': 'Replace', 'pattern': {'String': ' '},
                                                           'content': SPACE}]  # Llama 2's, before Metaspace
SPM_DECODERS = {'Replace', 'ByteFallback', 'Fuse', 'Strip', 'Metaspace'}  # all one decode: see SentencePieceBPE

# ----------------------------------------------------------------------------------------------------------
# GGUF metadata: llama.cpp's tokenizer.ggml.* keys, read as llama.cpp reads them, into the pieces above

# tokenizer.ggml.pre: llama.cpp's names for split regexes (llama-vocab.cpp), here the regexes of the models' own
# tokenizer.json (llama.cpp rewrites them for its regex engine); the models of a row split text alike. 'default'
# (and no name, in files older than the key) is a makeshift in llama.cpp; transformers reads GPT-2's regex there.
GGUF_PRE = [('gpt-2 gpt2 default mpt olmo phi-2 jais exaone4', GPT2_SPLIT_PATTERN),
            ('smollm starcoder refact command-r codeshell exaone minerva-7b', GPT2_DIGITS_PATTERN),
            ('llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral dbrx smaug-bpe', LLAMA3_SPLIT_PATTERN),
            ('qwen2 deepseek-r1-qwen', QWEN2_SPLIT_PATTERN)]
GGUF_PRE_PATTERNS = {name: pattern for names, pattern in GGUF_PRE for name in names.split()}
GGUF_LLAMA3 = {'llama-bpe', 'llama3', 'llama-v3', 'falcon3', 'falcon-h1', 'pixtral'}  # ignore_merges, and a bos
GGUF_NFC = {'qwen2', 'deepseek-r1-qwen'}  # Qwen's tokenizer.json normalizes to NFC (llama.cpp does not)
SPECIAL_TYPES = {2, 3, 4}  # token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
GGUF_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}


def shown(name):
    """A name from a file as it can stand in a one-line message: escaped where it holds a newline or the like,
    and cut where long (a damaged length can make a key of a whole header)."""
    return name if name.isprintable() and 0 < len(name) <= 80 else repr(name[:80]) + '...' * (len(name) > 80)


class GGUFCursor:
    """Reads a GGUF file's values in order from buf (bytes, a memoryview or an mmap), from byte pos on, with a
    BPEError that names where (not a struct.error) when the file ends early or is damaged."""

    def __init__(self, buf, where, pos=0):
        self.buf, self.where, self.pos = buf, where, pos

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            raise BPEError(f"{self.where}: truncated: the file ends inside {what} (byte {self.pos} of "
                           f"{len(self.buf)}); download it again")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code, what):
        value = struct.unpack_from('<' + code, self.buf, self.take(struct.calcsize(code), what))[0]
        # a float32 as the shortest decimal that rounds to it: 1e-05 where the bits say 9.999999747378752e-06
        return shortest_float32(value) if code == 'f' else value

    def string(self, what):
        n = self.scalar('Q', what)
        start = self.take(n, what)
        try:
            return str(self.buf[start:start + n], 'utf-8')
        except UnicodeDecodeError:
            raise BPEError(f"{self.where}: {what} is not UTF-8 text: the file is damaged") from None

    def value(self, kind, what, depth=0):
        if kind in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[kind], what)
        if kind == 8:
            return self.string(what)
        if kind != 9 or depth:  # arrays of arrays exist in the spec but no model uses them
            raise BPEError(f"{self.where}: {what} has value type {kind}, which is not a GGUF type (or a nested "
                           f"array): the file is damaged or from a newer GGUF version")
        item, n = self.scalar('I', what), self.scalar('Q', what)
        if item in GGUF_SCALARS:  # numbers (token scores, types): one struct call; a float32 exact, as a double
            code = GGUF_SCALARS[item]
            return list(struct.unpack_from(f'<{n}{code}', self.buf, self.take(n * struct.calcsize(code), what)))
        if n > len(self.buf) - self.pos:  # each item takes a byte at least: refuse a huge count before looping
            self.take(n, what)
        return [self.value(item, what, depth + 1) for _ in range(n)]


def read_gguf_header(buf, where):
    """(version, n_tensors, metadata, end) of the GGUF file (v2 or v3) whose bytes are buf (bytes, a memoryview
    or an mmap): its header and its metadata {key: value}; the tensor table starts at byte end (read it with
    GGUFCursor(buf, where, end), as weights.read_gguf does). A file that is not one raises a BPEError that
    names where and says what to do."""
    if not len(buf):
        raise BPEError(f"{where}: empty file, not GGUF")
    if bytes(buf[:4]) != b'GGUF':
        raise BPEError(f"{where} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    r = GGUFCursor(buf, where, 4)
    version = r.scalar('I', 'the version')
    if version not in (2, 3):
        hint = ("a big-endian file: convert it on a little-endian machine" if version > 0xFFFF else
                "version 1 files are from 2023: convert the model again with a current llama.cpp" if version == 1
                else "a newer format than this reader knows")
        raise BPEError(f"{where}: GGUF version {version} is not supported (2 and 3 are): {hint}")
    n_tensors, n_kv = r.scalar('Q', 'the tensor count'), r.scalar('Q', 'the metadata count')
    if n_tensors > len(buf) or n_kv > len(buf):
        raise BPEError(f"{where}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                       f"the file can hold: it is damaged")
    metadata = {}
    for i in range(n_kv):
        key = r.string(f'metadata key {i}')
        if key in metadata:
            raise BPEError(f"{where}: metadata key {shown(key)} appears twice: the file is damaged")
        metadata[key] = r.value(r.scalar('I', f'the type of {shown(key)}'), f'metadata {shown(key)}')
    return version, n_tensors, metadata, r.pos


def read_gguf_metadata(path):
    """The metadata {key: value} of the GGUF file at path (v2 or v3), read with the standard library alone, so
    that a tokenizer comes out of a model file without torch (prepare.py); the tensors are not read. Values are
    as weights.read_gguf gives them (it reads them with read_gguf_header too)."""
    path = os.fspath(path)
    try:
        with open(path, 'rb') as f:
            if not os.fstat(f.fileno()).st_size:  # (mmap cannot map an empty file)
                read_gguf_header(b'', path)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise BPEError(f"cannot read {path} ({e.strerror or e})") from None
    with buf:
        return read_gguf_header(buf, path)[2]


def shortest_float32(x):
    """The shortest decimal that rounds to the float32 x, the nearer of two that do, as a float (numpy's str of
    a float32).

    >>> shortest_float32(struct.unpack('<f', struct.pack('<f', 1e-05))[0])
    1e-05
    """
    if not math.isfinite(x):
        return x
    exact = struct.pack('<f', x)

    def rounds_to_x(y):
        try:
            return struct.pack('<f', y) == exact
        except OverflowError:  # rounded up past the largest float32
            return False
    for digits in range(1, 9):  # (9 digits always give x back)
        mantissa, exponent = f'{x:.{digits - 1}e}'.split('e')
        y = float(f'{mantissa}e{exponent}')  # the nearest decimal of so many digits
        if rounds_to_x(y):
            return y
        # at a power of two the float32s below are closer together than those above: the decimal on the other
        # side of x, farther from it, may round to it where the nearest does not
        other = float(f'{int(mantissa.replace(".", "")) + (1 if y < x else -1)}e{int(exponent) - digits + 1}')
        if rounds_to_x(other):
            return other
    return float(f'{x:.9g}')


def pre_name(pattern):
    """The tokenizer.ggml.pre name under which llama.cpp splits text as pattern (a name in PATTERNS, or a regex)
    does, or BPEError. GPT-4's regex (bpe.py's default) gets Llama 3's name: the two differ only on whitespace
    that ends a text."""
    pattern = PATTERNS.get(pattern, pattern)
    if pattern == GPT4_SPLIT_PATTERN:
        return 'llama-bpe'
    for names, known in GGUF_PRE:
        if pattern in (known, isolated(known)):
            return names.split()[0]
    raise BPEError(f"llama.cpp has no pre-tokenizer name for the split pattern {pattern[:50]!r}...; tokenizers "
                   f"trained with pattern 'gpt4' or 'gpt2' can be written to GGUF")


def gguf_check(meta):
    """BPEError unless the tokenizer keys of GGUF metadata have the types llama.cpp gives them (a damaged or
    hand-made file may hold any GGUF value under any key)."""
    def need(key, ok, kind):
        if not (meta.get(key) is None or ok(meta[key])):
            raise BPEError(f"the GGUF metadata is damaged: {key} is not {kind}")
    listed = lambda ok: lambda v: isinstance(v, list) and all(map(ok, v))  # noqa: E731
    need('tokenizer.ggml.tokens', listed(lambda t: isinstance(t, str)), 'a list of strings')
    need('tokenizer.ggml.merges', listed(lambda t: isinstance(t, str)), 'a list of strings')
    need('tokenizer.ggml.token_type', listed(lambda k: type(k) is int), 'a list of integers')
    need('tokenizer.ggml.scores', listed(lambda s: type(s) in (int, float) and math.isfinite(s)),
         'a list of finite numbers')
    for key in ('tokenizer.ggml.pre', 'tokenizer.chat_template', 'general.basename', 'general.name'):
        need(key, lambda v: isinstance(v, str), 'a string')


def gguf_settings(meta):
    """The class's arguments (kind: a key of KINDS) from GGUF metadata {key: value}."""
    model, tokens = meta.get('tokenizer.ggml.model'), meta.get('tokenizer.ggml.tokens')
    if model not in ('gpt2', 'llama'):
        raise BPEError(f"tokenizer.ggml.model {model!r:.40} is not one bpe.py reads ('gpt2': byte-level BPE, 'llama': "
                       "SentencePiece-style BPE)" if model else "the GGUF metadata has no tokenizer.ggml.model: "
                       "the file carries no tokenizer")
    if not tokens:
        raise BPEError("the GGUF metadata has no tokenizer.ggml.tokens: the file carries no vocabulary to encode with")
    gguf_check(meta)
    types = meta.get('tokenizer.ggml.token_type') or [1] * len(tokens)
    scores = meta.get('tokenizer.ggml.scores') or [0.0] * len(tokens)
    if not len(types) == len(scores) == len(tokens):
        raise BPEError(f"the GGUF metadata is damaged: {len(tokens)} tokens, {len(types)} token types and "
                       f"{len(scores)} scores")

    def text_of(key):  # of the bos, eos or unknown token
        i = meta.get(f'tokenizer.ggml.{key}_token_id')
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    ordinary = {i: t for i, (t, k) in enumerate(zip(tokens, types)) if k not in SPECIAL_TYPES}
    common = dict(special_tokens={t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in SPECIAL_TYPES},
                  bos_token=text_of('bos'), eos_token=text_of('eos'), chat_template=meta.get('tokenizer.chat_template'),
                  name=meta.get('general.basename') or meta.get('general.name') or 'gguf')
    if model == 'llama':  # llama.cpp: a space before the text and a bos unless the file says not
        return dict(kind='sentencepiece', tokens=ordinary, scores={i: float(scores[i]) for i in ordinary},
                    unk_token=text_of('unknown'), add_bos_token=bool(meta.get('tokenizer.ggml.add_bos_token', True)),
                    prepend_scheme='legacy' if meta.get('tokenizer.ggml.add_space_prefix', True) else 'never',
                    **common)
    pre = meta.get('tokenizer.ggml.pre') or 'default'
    if pre not in GGUF_PRE_PATTERNS:
        raise BPEError(f"tokenizer.ggml.pre {pre!r:.40} names a split regex bpe.py does not know (it knows "
                       f"{', '.join(GGUF_PRE_PATTERNS)})")
    if not (merges := meta.get('tokenizer.ggml.merges')):
        raise BPEError("the GGUF metadata has no tokenizer.ggml.merges, which byte-level BPE (model gpt2) needs")
    pairs = [m.split(' ') for m in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise BPEError("the GGUF metadata is damaged: an entry of tokenizer.ggml.merges is not two tokens")
    chars = byte_chars()  # tokens are written in GPT-2's byte characters; one with other characters is plain text
    memo = {}  # each token is spelled once, though the merges name it again and again

    def spelled(t):
        if (b := memo.get(t)) is None:
            b = memo[t] = bytes(chars[c] for c in t) if all(c in chars for c in t) else t.encode('utf-8')
        return b
    return dict(kind='bpe', ranks={spelled(t): i for i, t in ordinary.items()}, pattern=GGUF_PRE_PATTERNS[pre],
                merges={(spelled(a), spelled(b)): n for n, (a, b) in enumerate(pairs)},
                ignore_merges=pre in GGUF_LLAMA3, normalizer='NFC' if pre in GGUF_NFC else None,
                add_bos_token=bool(meta.get('tokenizer.ggml.add_bos_token', pre in GGUF_LLAMA3)), **common)

# ----------------------------------------------------------------------------------------------------------
# chat templates: Jinja, run as transformers runs them


def render_chat(template, messages, add_generation_prompt=True, bos_token=None, eos_token=None, **extra):
    """The prompt text a chat template (Jinja) makes of messages [{'role': 'user', 'content': ...}, ...], as
    transformers' apply_chat_template(messages, tokenize=False) renders it; extra goes to the template too
    (tools=..., enable_thinking=...). A template that fails, or refuses the messages, raises BPEError."""
    try:
        import jinja2
    except ImportError:
        raise BPEError("chat templates need jinja2: pip install jinja2") from None
    context = {'tools': None, 'documents': None}  # set, as transformers sets them: `tools is none` holds
    context.update({key: value for key, value in (('bos_token', bos_token), ('eos_token', eos_token)) if value})
    # as transformers: a key set to None is left out (templates test `'content' in message`, not for None)
    messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
    try:
        return compile_chat_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      **{**context, **extra})
    except jinja2.TemplateSyntaxError as e:
        raise BPEError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except jinja2.TemplateError as e:  # the template's raise_exception(...) lands here
        raise BPEError(f"the chat template refused the messages: {str(e).splitlines()[0]}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise BPEError(f"the chat template failed on these messages ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


@functools.lru_cache(maxsize=8)
def compile_chat_template(template):
    """A template in transformers' Jinja environment: sandboxed, trim_blocks and lstrip_blocks, loop controls,
    raise_exception(), strftime_now(), and a tojson that keeps non-ASCII and HTML characters as they are."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
    from datetime import datetime

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: it renders its body
        tags = {'generation'}  # (transformers marks the assistant's text with it, to train on)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters['tojson'] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)

# ----------------------------------------------------------------------------------------------------------
# command line: --key=value, as the rest of the repo, but parsed here so that this file stands alone

def flag(value):
    """A --key=value's True or False."""
    if value.lower() not in ('true', 'false'):
        raise ValueError(value)
    return value.lower() == 'true'


OPTIONS = {'input': str, 'vocab_size': int, 'out': str, 'pattern': str, 'special_tokens': str, 'chat_tokens': flag,
           'min_frequency': int, 'tiktoken_out': str, 'model': str, 'encode': str, 'decode': str}


def parse_args(argv):
    """{key: value} from --key=value arguments, typed by OPTIONS.

    >>> parse_args(['--vocab_size=512', '--input=a.txt'])
    {'vocab_size': 512, 'input': 'a.txt'}
    """
    opts = {}
    for arg in argv:
        key, eq, value = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
        if not eq:
            raise BPEError(f"argument {arg!r} must look like --key=value (keys: {', '.join(OPTIONS)})")
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=2)
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else f"keys: {', '.join(OPTIONS)}"
            raise BPEError(f"unknown option --{key}; {hint}")
        try:
            opts[key] = OPTIONS[key](value)
        except ValueError:
            kind = 'True or False' if OPTIONS[key] is flag else 'an integer'
            raise BPEError(f"--{key} must be {kind}, got {value!r}") from None
    return opts


def check_out(path, option):
    """BPEError unless a file can be made at path (--option's value): checked before training, which takes a while,
    so that a typo in the path does not throw the trained tokenizer away."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BPEError(f"--{option}={path} is a folder; give a file name, e.g. --{option}="
                       f"{os.path.join(path, 'tok.model' if option == 'out' else 'tok.tiktoken')}")
    if not os.path.isdir(folder):
        what = 'is a file, not a folder' if os.path.exists(folder) else 'does not exist: create it first'
        raise BPEError(f"--{option}={path} cannot be written: {folder} {what}")


def write(path, save, note=''):
    try:
        save(path)
    except OSError as e:  # e.g. no permission, or the disk is full
        raise BPEError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"wrote {path}{note}")


def main(argv):
    opts = parse_args(argv)
    if 'input' in opts:
        if 'vocab_size' not in opts:
            raise BPEError("training needs --vocab_size, e.g. --vocab_size=32000")
        out = opts.get('out', 'tok.model')
        check_out(out, 'out')
        if 'tiktoken_out' in opts:
            check_out(opts['tiktoken_out'], 'tiktoken_out')
        specials = [t for t in opts.get('special_tokens', ENDOFTEXT).split(',') if t]
        chat = opts.get('chat_tokens', True)  # ChatML's tokens after the others, and its template
        specials += [t for t in CHATML_TOKENS if chat and t not in specials]
        tok = train(opts['input'].split(','), opts['vocab_size'], opts.get('pattern', 'gpt4'), specials,
                    opts.get('min_frequency', 1), name=os.path.splitext(os.path.basename(out))[0],
                    chat_template=CHATML_TEMPLATE if chat else None)
        write(out, tok.save, f" ({tok.vocab_size:,} tokens)")
        if 'tiktoken_out' in opts:
            write(opts['tiktoken_out'], tok.save_tiktoken)
    elif 'model' in opts:
        model = opts['model']  # a file, or the name of a tiktoken encoding (names have no dots or slashes)
        is_file = os.path.exists(model) or not model.isidentifier()
        tok = Tokenizer.load(model) if is_file else Tokenizer.from_tiktoken(model)
    elif opts:
        raise BPEError("give --input=... to train, or --model=... with --encode/--decode")
    else:
        sys.exit(__doc__.strip().split('\n\n')[1])
    if 'encode' in opts:
        ids = tok.encode(opts['encode'], allowed_special='all')
        print(ids)
        print(' '.join(repr(tok.decode([i])) for i in ids))
    if 'decode' in opts:
        try:
            ids = [int(i) for i in opts['decode'].replace(',', ' ').split()]
        except ValueError:
            raise BPEError("--decode takes ids separated by commas, e.g. --decode=15496,995") from None
        print(tok.decode(ids))


if __name__ == '__main__':
    sys.stdout.reconfigure(errors='backslashreplace')  # a terminal that cannot show a character gets an escape
    try:
        main(sys.argv[1:])
    except BPEError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)

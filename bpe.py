"""
Byte-level BPE: train your own tokenizer fast, encode it in readable pure Python, hand it to tiktoken to run.

    python bpe.py --input=data/ --vocab_size=32000 --out=tok.model     # train on files, folders, .jsonl
    python bpe.py --model=tok.model --encode="Hello world"              # a quick look at the ids
    python bpe.py --model=gpt2 --decode=15496,995                       # gpt2, cl100k_base: tiktoken's files

After `import bpe` (this file needs only the standard library, regex and tiktoken, so copy it anywhere):
    tok = bpe.train(['input.txt'], vocab_size=32000)   # a str is the text itself, a list holds paths
    ids = tok.encode('hi<|endoftext|>', allowed_special='all')
    enc = tok.to_tiktoken()                             # the same ids, fast: what prepare.py uses
    tok.save('tok.model'); tok = bpe.Tokenizer.load('tok.model')
    text = tok.dumps(); tok = bpe.Tokenizer.loads(text)  # the same file's text, in memory
    tok = bpe.Tokenizer.from_hf('SmolLM2-135M/')        # a Hugging Face tokenizer.json: the same ids as its own

Training (train_ranks) is minbpe's algorithm, made fast in two ways. Text is cut into chunks by a regex
(GPT-2's or GPT-4's split pattern) and each unique chunk is stored once, with its count. And where minbpe
recounts every pair of the whole text after every merge, here the pair counts are kept up to date: merging
(a, b) into z only touches the chunks that hold (a, b), and for each occurrence subtracts the pairs it
destroys ((x, a), (b, y)) and adds the pairs it makes ((x, z), (z, y)). A heap picks the next best pair.

Encoding follows tiktoken's rule, so the two give identical ids: within a chunk, repeatedly merge the adjacent
pair whose joined bytes are the lowest-ranked token (leftmost first). Ids are ranks: the 256 bytes, then the
merges in the order they were learned, then the special tokens. The same rule reproduces GPT-2 and GPT-4.
This file imports only the standard library and regex (tiktoken for the fast path, tqdm for progress bars).
"""
import base64
import codecs
import difflib
import heapq
import json
import os
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
PATTERNS = {'gpt2': GPT2_SPLIT_PATTERN, 'gpt4': GPT4_SPLIT_PATTERN, 'cl100k': GPT4_SPLIT_PATTERN}
ENDOFTEXT = '<|endoftext|>'
FILE_HEADER = 'bpe.py tokenizer v1'
NONE = sys.maxsize  # the rank of a byte string that is not a token
OPTIONAL = {'ignore_merges': False, 'normalizer': None, 'bos_token': None, 'eos_token': ENDOFTEXT,
            'chat_template': None}  # settings (from a tokenizer.json) that model files hold when not these


class BPEError(ValueError):
    """A mistake in the input (a path, a setting, disallowed special text): one line the user can act on."""


def chunker(pattern):
    """A function text -> list of regex chunks (a name in PATTERNS or any regex).

    >>> chunker('gpt4')("Hello world's  123456")
    ['Hello', ' world', "'s", ' ', ' ', '123', '456']
    """
    pattern = PATTERNS.get(pattern, pattern)
    try:
        rx = regex.compile(pattern)
    except regex.error as e:
        raise BPEError(f"split pattern {pattern!r} is not a valid regex ({e})") from None
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
    ties go to the smallest (left id, right id), i.e. to the oldest tokens, bytes by value.

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


def train(text_or_paths, vocab_size, pattern='gpt4', special_tokens=(ENDOFTEXT,), min_frequency=1, name='bpe',
          progress=True):
    """A Tokenizer trained on a str of text, or on a list of paths (text files, .jsonl files, folders).
    vocab_size counts everything: 256 bytes, the merges, and the special tokens (which take the last ids).
    pattern: 'gpt4' (tiktoken's cl100k split, the default), 'gpt2', or any regex."""
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
    chunk_counts = {valid_text(chunk).encode('utf-8'): n for chunk, n in counts.items()}
    del counts
    n_tokens = vocab_size - len(special_tokens)
    ranks = train_ranks(chunk_counts, n_tokens, min_frequency, progress)
    if progress:
        if len(ranks) < n_tokens:
            print(f"stopped at {len(ranks) + len(special_tokens):,} tokens, short of vocab_size={vocab_size:,}: "
                  f"no pair left that occurs at least {min_frequency} time(s)")
        print(f"trained in {time.time() - t0:.1f}s")
    return Tokenizer(ranks, pattern, {t: len(ranks) + i for i, t in enumerate(special_tokens)}, name)

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
    (from_hf) also merges {(left, right): priority}, merged by instead of ranks, and the settings in OPTIONAL."""

    def __init__(self, ranks, pattern, special_tokens=None, name='bpe', merges=None, ignore_merges=False,
                 normalizer=None, bos_token=None, eos_token=ENDOFTEXT, chat_template=None):
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise BPEError(f"not a byte-level BPE: {len(missing)} of the 256 bytes (e.g. {missing[0]}) have no token")
        self.ranks, self.pattern, self.name = dict(ranks), pattern, name
        self.special_tokens = dict(special_tokens or {})
        self.vocab = {i: t for t, i in self.ranks.items()}  # id -> bytes, for decoding
        self.vocab.update({i: t.encode('utf-8') for t, i in self.special_tokens.items()})
        if len(self.vocab) < len(self.ranks) + len(self.special_tokens):
            raise BPEError(f"tokenizer {name!r} gives two tokens the same id")
        self.vocab_size = max(self.vocab) + 1
        self.eot_token = self.special_tokens.get(ENDOFTEXT)
        self.merges, self.ignore_merges, self.normalizer = merges, ignore_merges, normalizer
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        token_id = lambda t: self.special_tokens.get(t, self.ranks.get(t.encode('utf-8'))) if t else None
        self.bos_token_id, self.eos_token_id = token_id(bos_token), token_id(eos_token)  # None: none known
        self._split = chunker(pattern)
        self._cache = {}  # chunk -> ids: text repeats its words, so most chunks are merged only once
        self._encoding = None

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    def encode_ordinary(self, text):
        """Ids of text, special token strings encoded as ordinary text."""
        ids, cache, ranks = [], self._cache, self.ranks
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
                got = cache[chunk] = [ranks[piece]] if whole and piece in ranks else bpe_merge(piece, ranks, merges)
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
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def decode_bytes(self, ids):
        try:
            return b''.join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise BPEError(f"token id {e.args[0]!r} is not in the vocabulary of {self.name!r} "
                           f"(ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids):
        """Text of ids; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD, never an error."""
        return self.decode_bytes(ids).decode('utf-8', errors='replace')

    # ------------------------------------------------------------------------------------------------------
    # files and tiktoken

    def dumps(self):
        """The readable model file's text: a header, then one line per token in id (= merge) order, as the
        id and the token as a JSON string (or, when its bytes are not UTF-8, a JSON list of byte values).
        From a tokenizer.json, its settings (OPTIONAL) and merges too: 'merge left_id right_id', in its order."""
        lines = [FILE_HEADER, f'name {json.dumps(self.name)}', f'pattern {json.dumps(self.pattern)}']
        lines += [f'{key} {json.dumps(getattr(self, key))}' for key, default in OPTIONAL.items()
                  if getattr(self, key) != default]
        lines += [f'special {i} {json.dumps(t)}' for t, i in self.special_tokens.items()]
        for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            try:
                shown = json.dumps(token.decode('utf-8'), ensure_ascii=False)
            except UnicodeDecodeError:
                shown = json.dumps(list(token))
            lines.append(f'{i} {shown}')
        if self.merges:
            lines += [f'merge {self.ranks[a]} {self.ranks[b]}' for a, b in sorted(self.merges, key=self.merges.get)]
        return '\n'.join(lines) + '\n'

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
        """The Tokenizer whose dumps() is text; where names it in error messages."""
        fields, specials, ranks, merges = {}, {}, {}, []
        lines = text.split('\n')
        if lines[0] != FILE_HEADER:
            raise BPEError(f"{where} is not a bpe.py tokenizer file (its first line is not {FILE_HEADER!r})")
        for n, line in enumerate(lines[1:], 2):
            if not line and n == len(lines):  # the final newline
                break
            key, _, value = line.partition(' ')
            try:
                if key.isdigit():
                    token = json.loads(value)
                    ranks[token.encode('utf-8') if isinstance(token, str) else bytes(token)] = int(key)
                elif key == 'merge':
                    a, b = value.split(' ')
                    merges.append((int(a), int(b)))
                elif key == 'special':
                    i, _, name = value.partition(' ')
                    specials[json.loads(name)] = int(i)
                else:
                    fields[key] = json.loads(value)
            except (ValueError, TypeError):
                raise BPEError(f"{where}:{n} is damaged: {line[:80]!r}") from None
        if 'pattern' not in fields:
            raise BPEError(f"{where} has no pattern line")
        tokens = {i: t for t, i in ranks.items()}
        if missing := next((i for pair in merges for i in pair if i not in tokens), None):
            raise BPEError(f"{where} is damaged: a merge names token {missing}, which it does not have")
        merges = {(tokens[a], tokens[b]): n for n, (a, b) in enumerate(merges)}
        return cls(ranks, fields['pattern'], specials, fields.get('name', 'bpe'), merges or None,
                   **{key: fields[key] for key in OPTIONAL if key in fields})

    def to_tiktoken(self):
        """A tiktoken.Encoding with identical ids (built once, then reused). It merges by id, so from a tokenizer.json
        only if its ids follow its merges (GPT-2, Llama 3, Qwen2, SmolLM do). It does not normalize (Qwen2: NFC)."""
        if self._encoding is None:
            order = sorted(self.merges or (), key=lambda pair: self.merges[pair])  # HF's merges, in priority order
            if any(self.ranks[a + b] > self.ranks[c + d] for (a, b), (c, d) in zip(order, order[1:])):
                raise BPEError(f"tokenizer {self.name!r} numbers its tokens out of merge order, which tiktoken "
                               f"cannot follow (it merges by id): use encode() instead")
            import tiktoken
            self._encoding = tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                               special_tokens=self.special_tokens)
        return self._encoding

    def save_tiktoken(self, path):
        """Write the ranks as a .tiktoken file (base64 token, rank), the format tiktoken.load reads."""
        with open(path, 'w', encoding='ascii') as f:
            for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                f.write(f'{base64.b64encode(token).decode()} {i}\n')

    @classmethod
    def from_hf(cls, path):
        """A Tokenizer from a Hugging Face tokenizer.json of byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM), the
        file or its folder: the ids of the `tokenizers` library's encode(text, add_special_tokens=False), its
        added tokens (special or not) our special tokens. tokenizer_config.json beside it names bos and eos and
        has the chat_template (the Jinja text, not run). Other tokenizers raise a BPEError that says why."""
        return cls(**hf_settings(os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else os.fspath(path)))

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

# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM), read into the pieces above

SENTENCEPIECE = 'SentencePiece, e.g. Llama 2 / TinyLlama / Mistral'
HINTS = {'Metaspace': SENTENCEPIECE, 'byte_fallback': SENTENCEPIECE, 'Unigram': 'SentencePiece, e.g. T5 / ALBERT',
         'WordPiece': 'e.g. BERT'}  # the models users know these by
# SmolLM's Digits(individual_digits) then GPT-2's regex, as one regex: each digit is a chunk, and the regex
# sees the text before a digit as ending there (`(?!\S)` becomes "followed by a space, a digit or the end")
GPT2_DIGITS_PATTERN = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++(?=\p{N}|$)"""
                       r"""|\s+(?![^\s\p{N}])|\s""")


def unsupported(what):
    hint = next((f' ({h})' for key, h in HINTS.items() if key in what), '')
    return BPEError(f"tokenizer.json uses {what}{hint}, which bpe.py does not support; byte-level BPE models "
                    f"(GPT-2, Llama 3, Qwen2, SmolLM) load")


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
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except ValueError as e:
        raise BPEError(f"{path} is not JSON ({e})") from None


def hf_settings(file):
    """Tokenizer(...)'s arguments from a tokenizer.json file and the tokenizer_config.json beside it."""
    if not os.path.isfile(file):
        raise BPEError(f"{file} not found (from_hf takes a tokenizer.json file or the folder that holds it)")
    hf, folder = read_json(file), os.path.dirname(file)
    model, config = hf.get('model') or {}, os.path.join(folder, 'tokenizer_config.json')
    config = read_json(config) if os.path.isfile(config) else {}
    if model.get('type', 'BPE') != 'BPE':
        raise unsupported(f"the {model['type']} model")
    if bad := [k for k in ('byte_fallback', 'continuing_subword_prefix', 'end_of_word_suffix', 'dropout')
               if model.get(k)]:
        raise unsupported(f"{bad[0]}={model[bad[0]]!r}")
    normalizer = hf.get('normalizer') or {}  # none, one, or a Sequence of them
    normalizers = [n.get('type') for n in normalizer.get('normalizers', [normalizer]) if n]
    if normalizers not in ([], ['NFC'], ['NFD'], ['NFKC'], ['NFKD']):  # these unicodedata does exactly
        raise unsupported(f"the normalizer {'+'.join(map(str, normalizers))}")
    pattern = hf_pattern(hf.get('pre_tokenizer'))
    if (hf.get('decoder') or {}).get('type') != 'ByteLevel':
        raise unsupported(f"the {(hf.get('decoder') or {}).get('type')} decoder")
    added = hf.get('added_tokens') or []
    if strip := [t['content'] for t in added if t.get('lstrip') or t.get('rstrip') or t.get('single_word')]:
        raise unsupported(f"the added token {strip[0]!r} with lstrip, rstrip or single_word")
    added, chars = {t['content']: t['id'] for t in added}, byte_chars()
    try:  # tokens are written in GPT-2's byte characters; added tokens are plain text, with their own ids
        ranks = {bytes(chars[c] for c in t): i for t, i in (model.get('vocab') or {}).items() if t not in added}
        pairs = [m.split(' ') if isinstance(m, str) else m for m in model.get('merges') or []]
        merges = {(bytes(chars[c] for c in a), bytes(chars[c] for c in b)): n for n, (a, b) in enumerate(pairs)}
    except KeyError as e:
        raise BPEError(f"{file} is not byte-level BPE: a token has the character {e.args[0]!r}") from None
    except ValueError:
        raise BPEError(f"{file} has a merge that is not two tokens") from None
    name = lambda t: t.get('content') if isinstance(t, dict) else t  # "<s>" or {"content": "<s>", ...}
    template = config.get('chat_template')
    if isinstance(template, list):  # older files: named templates
        template = {t.get('name'): t.get('template') for t in template}.get('default')
    return dict(ranks=ranks, pattern=pattern, special_tokens=added, merges=merges, normalizer=normalizers[0] if
                normalizers else None, ignore_merges=bool(model.get('ignore_merges')), chat_template=template,
                bos_token=name(config.get('bos_token')), eos_token=name(config.get('eos_token', ENDOFTEXT)),
                name=os.path.basename(os.path.abspath(folder)) or 'hf')

# ----------------------------------------------------------------------------------------------------------
# command line: --key=value, as the rest of the repo, but parsed here so that this file stands alone

OPTIONS = {'input': str, 'vocab_size': int, 'out': str, 'pattern': str, 'special_tokens': str,
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
            raise BPEError(f"--{key} must be an integer, got {value!r}") from None
    return opts


def main(argv):
    opts = parse_args(argv)
    if 'input' in opts:
        if 'vocab_size' not in opts:
            raise BPEError("training needs --vocab_size, e.g. --vocab_size=32000")
        out = opts.get('out', 'tok.model')
        specials = [t for t in opts.get('special_tokens', ENDOFTEXT).split(',') if t]
        tok = train(opts['input'].split(','), opts['vocab_size'], opts.get('pattern', 'gpt4'), specials,
                    opts.get('min_frequency', 1), name=os.path.splitext(os.path.basename(out))[0])
        tok.save(out)
        print(f"wrote {out} ({tok.vocab_size:,} tokens)")
        if 'tiktoken_out' in opts:
            tok.save_tiktoken(opts['tiktoken_out'])
            print(f"wrote {opts['tiktoken_out']}")
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

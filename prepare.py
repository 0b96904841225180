"""
Turn text into the token files train.py reads: out_dir/train.bin, out_dir/val.bin and out_dir/meta.json.

    python prepare.py                                    # Tiny Shakespeare, characters (offline: see below)
    python prepare.py --dataset=shakespeare              # the same text, GPT-2 BPE tokens
    python prepare.py --input=input.txt                  # a local copy of Tiny Shakespeare, no download
    python prepare.py --dataset=pydocs                   # offline: Python's own help texts and docstrings
    python prepare.py --dataset=text --input=notes/ --tokenizer=gpt2 --out_dir=data/notes
    python prepare.py --dataset=text --input=notes/ --tokenizer=bpe --vocab_size=4096 --out_dir=data/notes
    python prepare.py --dataset=text --input=notes/ --tokenizer=bpe --tokenizer_path=tok.model   # from bpe.py
    python prepare.py --dataset=text --input=notes/ --tokenizer_from=SmolLM2-135M-Instruct.Q4_1.gguf  # a model's

--tokenizer=bpe uses our own byte-level BPE (bpe.py): trained on the train split only with --vocab_size
(GPT-4's split pattern; the last ids are the special tokens <|endoftext|>, <|im_start|> and <|im_end|>, and the
tokenizer keeps ChatML's chat template, so a model trained on it chats in ChatML; --chat_tokens=False reserves
<|endoftext|> alone), or loaded from --tokenizer_path, a file written by `python bpe.py --out=...` that has an
<|endoftext|> token. --tokenizer_from=SRC tokenizes with an existing model's tokenizer instead: a .gguf file,
a Hugging Face folder (tokenizer.json, and tokenizer_config.json for the chat template) or a bpe.py file, with
its special tokens and chat template, so that a model trained from scratch on the data shares the teacher's
vocabulary and chat format (documents are separated by its <|endoftext|>, else its end-of-sequence token).
Either way the tokenizer is saved as out_dir/tokenizer.model and meta.json records its sha256; train.py copies
it into every checkpoint, so sample.py needs no data folder. Special tokens' text in the documents is encoded
as plain text, never as the special token.

Datasets: shakespeare_char and shakespeare download Tiny Shakespeare once (cached in cache_dir); text reads
--input, a .txt/.md/.jsonl file, a folder (searched for those recursively) or a glob, where a .jsonl record's
"text" field is one document; pydocs needs no network. With no arguments at all and no network, prepare.py
says so and writes pydocs into data/shakespeare_char, so `python prepare.py && python train.py` always works.

The .bin files are flat arrays of token ids (uint16, or uint32 for vocabularies over 65,536), ready for
np.memmap. As in nanoGPT the last val_fraction of the *text* (in characters, documents joined by a
separator) is the validation split and each side is tokenized on its own, so the GPT-2 counts for
Shakespeare are nanoGPT's: 301,966 train and 36,059 val tokens. meta.json records the vocabulary, the
tokenizer, the token counts and the sha256 of the text; re-running with the same text and settings does
nothing. Files are written under temporary names and renamed, meta.json last, so a crash never leaves a
half-written dataset behind.

Streaming datasets, for corpora too large for memory or disk, read gzipped JSONL shards one at a time:

    python prepare.py --dataset=dolma --max_tokens=5e9 --num_proc=8       # Dolma v1_6-sample's URL list
    python prepare.py --dataset=c4 --max_tokens=1e9                       # allenai/c4 en, json.gz shards
    python prepare.py --dataset=fineweb_edu                               # sample/10BT, parquet: needs pyarrow
    python prepare.py --dataset=urls --input=shards.txt                   # one URL or path per line
    python prepare.py --dataset=urls --input=a.jsonl.gz,https://host/b.jsonl.gz,notes.txt.gz

--input gives the source shards (for dolma, c4 and fineweb_edu it replaces the default list): a file, local or
a URL, that lists them one per line, or a comma-separated list. A shard is .jsonl or .json (one JSON object
with a "text" string per line), .txt (one document), either of them gzipped (.gz), or .parquet (a "text"
column; needs pyarrow). Documents shorter than --min_chars or seen before (same blake2b hash of the text) are
dropped. The first --val_tokens tokens' worth of documents go to val.bin, the rest to train_00000.bin,
train_00001.bin, ... of --shard_tokens each, eot between documents; meta.json lists the shards and counts the
documents. After each source shard the progress is saved (stream_state.json), so re-running an interrupted
command continues from there and ends with the same bytes; downloaded shards are deleted once tokenized
(--keep_downloads=True keeps them). Memory holds one batch of documents per process plus the set of hashes,
about 100 bytes per kept document.
"""
import collections
import contextlib
import gzip
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import platform
import re
import signal
import time
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from urllib.parse import urljoin

import numpy as np
from tqdm import tqdm

import bpe
from configurator import (DownloadError, UserError, cached_download, decode_file, list_files, parse_config, run_cli,
                          tiktoken_encoding, writable_dir, write_atomic)

PREPARE_VERSION = 1  # bump when the output for the same input changes; older data is then rebuilt
DATASETS = ('shakespeare_char', 'shakespeare', 'text', 'pydocs', 'dolma', 'fineweb_edu', 'c4', 'urls')
STREAM_DATASETS = DATASETS[4:]  # many source shards in, numbered token shards out
TEXT_EXTS = ('.txt', '.md', '.jsonl')
MIN_SPLIT_TOKENS = 2  # each split needs at least one (input, target) pair
SEPARATOR = {'char': '\n\n', 'gpt2': bpe.ENDOFTEXT, 'bpe': bpe.ENDOFTEXT}  # between documents; for BPE one token, eot
TOKENIZER_FILE = 'tokenizer.model'  # a bpe tokenizer, beside meta.json
CHAT_TOKENS = (bpe.ENDOFTEXT,) + bpe.CHATML_TOKENS  # the special tokens of a bpe tokenizer trained here
PYDOCS_SOURCE = f'pydoc_data.topics and stdlib docstrings (Python {platform.python_version()})'


@dataclass
class PrepareConfig:
    dataset: str = 'shakespeare_char'  # shakespeare_char | shakespeare | text | pydocs; streaming: dolma | c4 |
                                       # fineweb_edu | urls
    out_dir: str = ''                  # '' = data/<dataset>
    input: str = ''                    # a local file instead of the download; for text: a file, folder or glob
                                       # (or several: a,b,c);
                                       # streaming: a list of shards (file or URL, one per line) or a,b,c
    tokenizer: str = ''                # char | gpt2 | bpe; '' = gpt2 for shakespeare and streaming, else char
    vocab_size: int = 0                # bpe: train a tokenizer of this many tokens on the train split
    tokenizer_path: str = ''           # bpe: use this file from `python bpe.py --out=...` instead of training
    tokenizer_from: str = ''           # bpe: an existing model's tokenizer: a .gguf, a Hugging Face folder or a
                                       # bpe.py file (with its special tokens and chat template)
    chat_tokens: bool = True           # bpe, trained: reserve <|im_start|> <|im_end|>, keep ChatML's template
    val_fraction: float = 0.1          # the last this much of the text is the validation split (not streaming)
    url: str = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    cache_dir: str = 'data/.cache'     # downloads are kept here and not fetched again
    timeout: float = 30.0              # seconds to wait for the download server
    # streaming datasets only (counts of tokens are floats so that 5e9 works)
    num_proc: int = 0                  # tokenizer processes; 0 = one per CPU core
    max_tokens: float = 0              # stop after this many tokens in all (the last document is cut); 0 = no limit
    shard_tokens: float = 1e8          # tokens per train_NNNNN.bin
    val_tokens: float = 1e6            # val.bin: the first documents, until it holds at least this many tokens
    min_chars: int = 1                 # drop documents with fewer characters (not counting outer whitespace)
    keep_downloads: bool = False       # keep downloaded source shards in cache_dir after they are tokenized


# ----------------------------------------------------------------------------------------------------------
# getting the text: a list of documents


def find_files(pattern):
    """The files --input names: one file, the .txt/.md/.jsonl files under a folder, or a glob's matches; or
    several of these, comma-separated, in that order."""
    if ',' in pattern and not os.path.exists(os.path.expanduser(pattern)):
        return [f for part in pattern.split(',') if part.strip() for f in find_files(part.strip())]
    folder = os.path.isdir(os.path.expanduser(pattern))
    files = list_files(pattern, TEXT_EXTS if folder else None)
    if files is None:
        raise UserError(f"input '{pattern}' not found: give a file, a folder or a glob such as 'notes/**/*.md'")
    if not files:
        raise UserError(f"no {', '.join(TEXT_EXTS)} files in folder '{pattern}'" if folder else
                        f"no files match '{pattern}'")
    return files


def jsonl_text(line):
    """The "text" string of one JSON line (str or bytes), or None if it has none."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or bytes that are not UTF-8
        return None
    text = record.get('text') if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None
    # JSON can hold half an emoji (a lone surrogate), which no encoder takes: make it U+FFFD
    return text.encode('utf-8', 'surrogatepass').decode('utf-8', 'replace')


def read_documents(pattern):
    """One document per text file or per jsonl record; skips (and counts) files and records it cannot use."""
    files = find_files(pattern)
    docs, bad_files, bad_records = [], [], 0
    for path in tqdm(files, desc='reading', unit='file', disable=None):
        text, why = decode_file(path)
        if text is None:
            if len(files) == 1:
                raise UserError(f"'{path}' {why}; give a UTF-8 text file (convert with e.g. "
                                f"`iconv -f latin1 -t utf-8`)")
            bad_files.append(path)
        elif path.lower().endswith('.jsonl'):
            for line in filter(str.strip, text.splitlines()):
                doc = jsonl_text(line)
                if doc is None:
                    bad_records += 1
                else:
                    docs.append(doc)
        else:
            docs.append(text)
    if bad_files:
        print(f"skipped {len(bad_files)} binary/non-UTF-8 files (first: {bad_files[0]})")
    if bad_records:
        print(f"skipped {bad_records} jsonl lines that were not JSON objects with a \"text\" string")
    docs = [d for d in docs if d.strip()]
    if not docs:
        if bad_files and len(bad_files) == len(files):
            raise UserError(f"no usable text in '{pattern}': all {len(files)} files are binary or not UTF-8 "
                            f"(first: {bad_files[0]}); convert them to UTF-8 text")
        extra = f" ({bad_records} jsonl lines lacked a \"text\" string)" if bad_records else ''
        raise UserError(f"'{pattern}' has no text{extra}: give files with some text in them")
    return docs


# A fixed list, so the corpus is the same on every run of the same Python version
PYDOCS_MODULES = '''abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code
codecs collections colorsys compileall concurrent.futures configparser contextlib contextvars copy copyreg csv
ctypes dataclasses datetime dbm decimal difflib dis doctest email email.message email.policy email.utils enum errno
faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib gzip
hashlib heapq hmac html html.parser http http.client http.cookiejar http.cookies http.server imaplib importlib
importlib.metadata importlib.resources inspect io ipaddress itertools json keyword linecache locale logging
logging.config logging.handlers lzma mailbox marshal math mimetypes mmap multiprocessing netrc numbers operator
optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile pydoc
queue quopri random re reprlib runpy sched secrets select selectors shelve shlex shutil signal site smtplib socket
socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys sysconfig tabnanny tarfile tempfile
textwrap threading time timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest
unittest.mock urllib.parse urllib.request uuid venv warnings wave weakref wsgiref xml.dom xml.dom.minidom
xml.etree.ElementTree xml.sax zipapp zipfile zipimport zlib zoneinfo'''.split()


def pydocs_documents():
    """Python's help topics, then the docstrings of PYDOCS_MODULES and their public classes, functions and
    methods: one document per topic and per module, in sorted order, each docstring once."""
    from pydoc_data.topics import topics
    docs = [f'{name}\n\n{text.strip()}' for name, text in sorted(topics.items())]
    seen = set()
    with warnings.catch_warnings():  # deprecated names (typing.io, ...) warn when touched
        warnings.simplefilter('ignore')
        for name in sorted(PYDOCS_MODULES):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue  # e.g. a Python built without sqlite3 or ssl
            objects = [(name, module)]
            for attr, obj in sorted(vars(module).items()):
                owner = getattr(obj, '__module__', None) or ''
                if attr.startswith('_') or not (inspect.isclass(obj) or inspect.isroutine(obj)) or \
                        not (owner == name or owner.startswith(name + '.')):
                    continue  # private, data, or imported from elsewhere
                objects.append((f'{name}.{attr}', obj))
                if inspect.isclass(obj):
                    objects += [(f'{name}.{attr}.{m}', member) for m, member in sorted(vars(obj).items()) if
                                not m.startswith('_') and (inspect.isroutine(member) or isinstance(member, property))]
            parts = []
            for qualname, obj in objects:
                doc = inspect.getdoc(obj)
                if doc and doc not in seen:  # inherited and shared docstrings would repeat thousands of times
                    seen.add(doc)
                    parts.append(f'{qualname}\n\n{doc}')
            if parts:
                docs.append('\n\n'.join(parts))
    return docs

# ----------------------------------------------------------------------------------------------------------
# tokenizers


def bpe_from_text(text, where):
    try:
        return bpe.Tokenizer.loads(text, where)
    except bpe.BPEError as e:
        raise UserError(str(e)) from None


def bpe_for(cfg, dataset, train_docs=None):
    """(bpe.Tokenizer, its model file's text, meta['tokenizer'] without the text) for cfg: the model's tokenizer
    cfg.tokenizer_from names, the file at cfg.tokenizer_path, else one trained with cfg.vocab_size on train_docs
    (None: give the fields only, and no tokenizer unless it comes from tokenizer_from)."""
    if cfg.tokenizer_from:
        tok = tokenizer_from(cfg.tokenizer_from)
        text = tok.dumps()  # with its special tokens and chat template
        fields = {'kind': 'bpe', 'file': TOKENIZER_FILE, 'sha256': hashlib.sha256(text.encode('utf-8')).hexdigest()}
        separator(tok, f"the tokenizer of '{cfg.tokenizer_from}'")
    elif cfg.tokenizer_path:
        try:
            with open(cfg.tokenizer_path, 'rb') as f:
                raw = f.read()
            text = raw.decode('utf-8')
        except OSError as e:
            raise UserError(f"tokenizer_path '{cfg.tokenizer_path}' cannot be read ({e.strerror or e}): give a file "
                            f"written by `python bpe.py --input=... --vocab_size=N --out=PATH`") from None
        except UnicodeDecodeError:
            raise UserError(f"tokenizer_path '{cfg.tokenizer_path}' is not a bpe.py tokenizer file (not UTF-8 text)")
        fields = {'kind': 'bpe', 'file': TOKENIZER_FILE, 'sha256': hashlib.sha256(raw).hexdigest()}
        if train_docs is None:
            return None, text, fields
        tok = bpe_from_text(text, cfg.tokenizer_path)
        separator(tok, f"tokenizer_path '{cfg.tokenizer_path}'")
    else:
        trained = {'vocab_size': cfg.vocab_size, 'pattern': 'gpt4'}  # (as before chat tokens, when without them)
        fields = {'kind': 'bpe', 'file': TOKENIZER_FILE, 'trained': {**trained, 'chat': 'chatml'} if cfg.chat_tokens
                  else trained}
        if train_docs is None:
            return None, None, fields
        try:  # documents joined by <|endoftext|>, which training cuts at: no merge spans two documents
            tok = bpe.train(bpe.ENDOFTEXT.join(train_docs), cfg.vocab_size, 'gpt4',
                            CHAT_TOKENS if cfg.chat_tokens else [bpe.ENDOFTEXT], name=f'{dataset}_bpe{cfg.vocab_size}',
                            chat_template=bpe.CHATML_TEMPLATE if cfg.chat_tokens else None)
        except bpe.BPEError as e:
            raise UserError(str(e)) from None
        text = tok.dumps()
        fields['sha256'] = hashlib.sha256(text.encode('utf-8')).hexdigest()
    return tok, text, {**fields, 'name': tok.name}


TOKENIZER_HINT = "give a .gguf file, a Hugging Face model folder (with tokenizer.json) or a bpe.py tokenizer file"


def tokenizer_from(src):
    """The bpe.Tokenizer of an existing model: a GGUF file (read without torch), a Hugging Face folder or its
    tokenizer.json, or a bpe.py tokenizer file."""
    if not os.path.exists(src):
        raise UserError(f"--tokenizer_from '{src}' not found: {TOKENIZER_HINT}")
    try:
        if os.path.isdir(src):
            if not os.path.isfile(os.path.join(src, 'tokenizer.json')):
                raise UserError(f"--tokenizer_from '{src}' is a folder without a tokenizer.json: {TOKENIZER_HINT}")
            return bpe.Tokenizer.from_hf(src)
        with open(src, 'rb') as f:
            head = f.read(len(bpe.FILE_HEADER) + 1)
        if head.startswith(b'GGUF'):
            return bpe.Tokenizer.from_gguf(bpe.read_gguf_metadata(src), where=src)
        if head == (bpe.FILE_HEADER + '\n').encode():
            return bpe.Tokenizer.load(src)
        if head.lstrip()[:1] == b'{':  # JSON: a tokenizer.json
            return bpe.Tokenizer.from_hf(src)
    except bpe.BPEError as e:
        raise UserError(f"--tokenizer_from: {e}") from None
    except OSError as e:
        raise UserError(f"--tokenizer_from '{src}' cannot be read ({e.strerror or e})") from None
    raise UserError(f"--tokenizer_from '{src}' is no tokenizer: {TOKENIZER_HINT}")


def separator(tok, where):
    """The id that goes between documents: <|endoftext|>, else the tokenizer's end-of-sequence token."""
    sep = tok.eot_token if tok.eot_token is not None else tok.eos_token_id
    if sep is None:
        raise UserError(f"{where} has no {bpe.ENDOFTEXT} token (nor an end-of-sequence token) to separate documents: "
                        f"train it with bpe.py's default --special_tokens")
    return sep


def bpe_encoder(tok):
    """encode(str) -> ids of a bpe.Tokenizer, special tokens' text read as plain text: tiktoken's where it can
    run the tokenizer (far faster), with the tokenizer's normalization (Qwen2's NFC); else bpe.py's own."""
    try:
        enc = tok.to_tiktoken()
    except bpe.BPEError:  # SentencePiece-style (Llama 2)
        return tok.encode_ordinary
    if tok.normalizer:
        return lambda s: enc.encode_ordinary(unicodedata.normalize(tok.normalizer, s))
    return enc.encode_ordinary


def pieces(text, size=1 << 20):
    """text in pieces of about size characters, for a progress bar. Cuts fall only after a newline between
    two non-space characters: GPT-2's pre-tokenizer splits there anyway, so the tokens do not change."""
    start = 0
    while start < len(text):
        end = text.find('\n', start + size) + 1
        while 0 < end < len(text) and (text[end - 2].isspace() or text[end].isspace()):
            end = text.find('\n', end) + 1
        end = end or len(text)
        yield text[start:end]
        start = end


def encode_documents(docs, encode, sep, desc, whole=False):
    """One array of the documents' tokens with sep (a token list) between documents; whole: encode each document
    in one piece (SentencePiece puts a space before each piece of text)."""
    parts = []
    with tqdm(total=sum(map(len, docs)), unit='char', unit_scale=True, desc=desc, disable=None) as bar:
        for i, doc in enumerate(docs):
            if i:
                parts.append(np.asarray(sep, dtype=np.int64))
            for piece in [doc] if whole else pieces(doc):
                parts.append(np.asarray(encode(piece), dtype=np.int64))
                bar.update(len(piece))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)

# ----------------------------------------------------------------------------------------------------------
# preparing a dataset


def split_documents(docs, val_fraction):
    """Cut the document list at the character where the last val_fraction of the text begins."""
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    for i, doc in enumerate(docs):
        if cut <= len(doc):
            return docs[:i] + [doc[:cut]], [doc[cut:]] + docs[i + 1:]
        cut -= len(doc)
    return docs, []


def load_corpus(cfg, fallback):
    """(dataset name, documents, source) for cfg; with fallback, pydocs if Tiny Shakespeare can't be had."""
    if cfg.dataset in ('shakespeare_char', 'shakespeare'):
        if cfg.input:
            return cfg.dataset, read_documents(cfg.input), cfg.input
        try:
            path = cached_download(cfg.url, cfg.cache_dir, cfg.timeout)
        except DownloadError as e:
            if not fallback:
                raise UserError(f"could not download Tiny Shakespeare from {cfg.url} ({e}); offline, use "
                                f"--input=PATH to a local copy, --dataset=pydocs, or --dataset=text "
                                f"--input=YOUR_FILES") from None
            print(f"could not download Tiny Shakespeare ({e}), so preparing the offline pydocs corpus "
                  f"(Python's help texts and docstrings) into {cfg.out_dir} instead")
            return 'pydocs', pydocs_documents(), PYDOCS_SOURCE
        return cfg.dataset, read_documents(path), cfg.url
    if cfg.dataset == 'text':
        if not cfg.input:
            raise UserError("--dataset=text needs --input=FILE, FOLDER or GLOB (.txt, .md or .jsonl files)")
        return 'text', read_documents(cfg.input), cfg.input
    if cfg.input:
        raise UserError("--dataset=pydocs builds its text from Python itself and takes no --input; "
                        "for your own files use --dataset=text")
    return 'pydocs', pydocs_documents(), PYDOCS_SOURCE


def tokenize(docs, kind, val_fraction, bpe_tok=None):
    """Split the documents into train and val text, then tokenize each (for kind bpe with bpe_tok, a
    bpe.Tokenizer). Returns ({split: tokens}, meta fields without the tokenizer's name and file)."""
    sep_text = SEPARATOR[kind]
    if kind == 'char':
        chars = sorted((set(sep_text) if len(docs) > 1 else set()).union(*map(set, docs)))
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, so searchsorted gives each id
        encode = lambda s: np.searchsorted(codes, np.frombuffer(s.encode('utf-32-le'), dtype=np.uint32))
        sep, info = encode(sep_text), {'vocab_size': len(chars), 'tokenizer': {'kind': 'char', 'chars': chars},
                                       'eot_token': None}
    elif kind == 'bpe':
        encode, sep = bpe_encoder(bpe_tok), [separator(bpe_tok, 'the tokenizer')]
        info = {'vocab_size': bpe_tok.vocab_size, 'tokenizer': None, 'eot_token': sep[0]}
    else:
        enc = tiktoken_encoding('gpt2')
        encode, sep = enc.encode_ordinary, [enc.eot_token]
        info = {'vocab_size': enc.n_vocab, 'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'},
                'eot_token': enc.eot_token}
    dtype = np.uint16 if info['vocab_size'] <= 65536 else np.uint32
    info['dtype'] = np.dtype(dtype).name
    splits = {}
    whole = isinstance(bpe_tok, bpe.SentencePieceBPE)
    for name, part in zip(('train', 'val'), split_documents(docs, val_fraction)):
        splits[name] = encode_documents(part, encode, sep, f'tokenizing {name}', whole).astype(dtype)
        if len(splits[name]) < MIN_SPLIT_TOKENS:
            raise UserError(f"the {name} split would have {len(splits[name])} tokens (at least {MIN_SPLIT_TOKENS} "
                            f"needed): give more text or change --val_fraction (now {val_fraction})")
    return splits, info


def text_sha256(docs, kind):
    """sha256 of the documents joined as they are tokenized (for a single file: the file's sha256)."""
    h = hashlib.sha256()
    for i, doc in enumerate(docs):
        h.update(((SEPARATOR[kind] if i else '') + doc).encode())
    return h.hexdigest()


def complete_meta(out_dir):
    """out_dir's meta.json if every token file it lists has its size and the bpe tokenizer file its sha256, else
    None (missing, damaged, cut short, or from another program). Both pipelines reuse data only on this."""
    try:
        with open(os.path.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta['dtype']).itemsize
        train = meta.get('train_shards') or [{'file': 'train.bin', 'tokens': meta['train_tokens']}]
        files = [('val.bin', meta['val_tokens'])] + [(s['file'], s['tokens']) for s in train]
        if any(os.path.getsize(os.path.join(out_dir, name)) != n * itemsize for name, n in files):
            return None
        if meta['tokenizer']['kind'] == 'bpe':
            with open(os.path.join(out_dir, meta['tokenizer']['file']), 'rb') as f:
                if hashlib.sha256(f.read()).hexdigest() != meta['tokenizer']['sha256']:
                    return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta


def already_prepared(out_dir, expect):
    """The existing meta.json if out_dir holds complete data made from the same text with the same settings
    (the tokenizer compared by its identity: kind, and for bpe its file or training settings)."""
    meta = complete_meta(out_dir)
    if meta is None:
        return None
    got = {**meta, 'tokenizer': bpe.tokenizer_identity(meta['tokenizer'])}
    return meta if all(got.get(k) == v for k, v in expect.items()) else None


def meta_json(meta):
    """meta.json's text: one key per line (a list such as the character list stays on one line)."""
    return '{\n' + ',\n'.join(f' {json.dumps(k)}: {json.dumps(v)}' for k, v in meta.items()) + '\n}\n'


def save_split(tokens, path):
    tokens.tofile(path)


def prepare(cfg, fallback=False):
    """Write cfg.out_dir/{train.bin, val.bin, meta.json}, unless they already hold this data (streaming
    datasets: see prepare_stream). Returns meta."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{cfg.dataset}'; choose one of {', '.join(DATASETS)}")
    if cfg.tokenizer not in ('', 'char', 'gpt2', 'bpe'):
        raise UserError(f"tokenizer must be char, gpt2 or bpe, not '{cfg.tokenizer}'")
    if cfg.tokenizer_from:
        if cfg.tokenizer not in ('', 'bpe'):
            raise UserError(f"--tokenizer_from tokenizes with that model's tokenizer: leave out "
                            f"--tokenizer={cfg.tokenizer}")
        if cfg.vocab_size or cfg.tokenizer_path:
            raise UserError("--tokenizer_from uses that model's tokenizer as it is: leave out " +
                            ("--vocab_size (its vocabulary is fixed)" if cfg.vocab_size else "--tokenizer_path"))
        cfg.tokenizer = 'bpe'
    if cfg.tokenizer != 'bpe' and (cfg.vocab_size or cfg.tokenizer_path):
        raise UserError("--vocab_size and --tokenizer_path are for --tokenizer=bpe")
    if not cfg.chat_tokens and not (cfg.tokenizer == 'bpe' and cfg.vocab_size):
        raise UserError("--chat_tokens is for a bpe tokenizer trained here (--tokenizer=bpe --vocab_size=N); "
                        "a tokenizer from a file or a model keeps the special tokens it has")
    if cfg.tokenizer == 'bpe':
        if cfg.vocab_size and cfg.tokenizer_path:
            raise UserError("give --vocab_size (train a tokenizer on the train split) or --tokenizer_path (use that "
                            "one), not both")
        given = cfg.tokenizer_path or cfg.tokenizer_from
        if not given and cfg.dataset in STREAM_DATASETS:
            raise UserError(f"--dataset={cfg.dataset} cannot train a tokenizer on its stream: train one with "
                            f"`python bpe.py --input=... --vocab_size=32000 --out=tok.model`, then pass "
                            f"--tokenizer_path=tok.model (or take a model's: --tokenizer_from=MODEL)")
        specials = CHAT_TOKENS if cfg.chat_tokens else (bpe.ENDOFTEXT,)
        if not given and cfg.vocab_size < 256 + len(specials):
            raise UserError(f"--tokenizer=bpe needs --vocab_size of at least {256 + len(specials)} (256 bytes and "
                            f"{', '.join(specials)}; e.g. 4096) to train one, or --tokenizer_path=FILE from bpe.py"
                            + (f", not {cfg.vocab_size}" if cfg.vocab_size else ''))
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (e.g. 0.1), not {cfg.val_fraction}")
    cfg.out_dir = cfg.out_dir or os.path.join('data', cfg.dataset)
    writable_dir(cfg.out_dir, 'out_dir')
    if cfg.dataset in STREAM_DATASETS:
        return prepare_stream(cfg)
    dataset, docs, source = load_corpus(cfg, fallback)
    kind = cfg.tokenizer or ('gpt2' if dataset == 'shakespeare' else 'char')
    tok_fields = bpe_for(cfg, dataset)[2] if kind == 'bpe' else {'kind': 'char' if kind == 'char' else 'tiktoken'}
    expect = {'dataset': dataset, 'sha256': text_sha256(docs, kind), 'val_fraction': cfg.val_fraction,
              'prepare_version': PREPARE_VERSION, 'tokenizer': bpe.tokenizer_identity(tok_fields)}
    old = already_prepared(cfg.out_dir, expect)
    if old:
        print(f"already prepared: {cfg.out_dir} holds {dataset} ({kind}), {old['train_tokens']:,} train and "
              f"{old['val_tokens']:,} val tokens")
        return old

    bpe_tok = model_text = None
    if kind == 'bpe':  # trained on the train split only: val stays unseen
        bpe_tok, model_text, tok_fields = bpe_for(cfg, dataset, split_documents(docs, cfg.val_fraction)[0])
    splits, info = tokenize(docs, kind, cfg.val_fraction, bpe_tok)
    if kind == 'bpe':
        info['tokenizer'] = tok_fields
    meta = {'dataset': dataset, **info, 'train_tokens': len(splits['train']), 'val_tokens': len(splits['val']),
            'val_fraction': cfg.val_fraction, 'source': source, 'sha256': expect['sha256'],
            'prepare_version': PREPARE_VERSION}
    # everything goes to temporary names first; the old meta.json is removed before the renames and the new
    # one comes last, so out_dir always holds either a complete dataset or no meta.json at all
    os.makedirs(cfg.out_dir, exist_ok=True)
    names = ('train.bin', 'val.bin') + ((TOKENIZER_FILE,) if model_text else ()) + ('meta.json',)
    tmp = {name: os.path.join(cfg.out_dir, name + '.tmp') for name in names}
    try:
        save_split(splits['train'], tmp['train.bin'])
        save_split(splits['val'], tmp['val.bin'])
        if model_text:
            with open(tmp[TOKENIZER_FILE], 'wb') as f:
                f.write(model_text.encode('utf-8'))  # the same bytes as tokenizer_path: the same sha256
        with open(tmp['meta.json'], 'w') as f:
            f.write(meta_json(meta))
        for name in ('meta.json',) + (() if model_text else (TOKENIZER_FILE,)):  # and a stale tokenizer
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))
        for name in names:
            os.replace(tmp[name], os.path.join(cfg.out_dir, name))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    print(f"wrote {cfg.out_dir}: {dataset}, {kind} tokenizer, vocab {meta['vocab_size']:,}, "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']})")
    return meta


# ----------------------------------------------------------------------------------------------------------
# streaming datasets: source shards in, one at a time; numbered token shards out

DOLMA_URLS = 'https://huggingface.co/datasets/allenai/dolma/resolve/main/urls/v1_6-sample.txt'
SHARD_PATTERNS = {  # the datasets whose shards are numbered: (URL pattern, number of shards)
    'c4': ('https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.{:05d}-of-01024.json.gz', 1024),
    'fineweb_edu': ('https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/'
                    '{:03d}_00000.parquet', 14),
}
SHARD_EXTS = ('.jsonl', '.json', '.txt', '.jsonl.gz', '.json.gz', '.txt.gz', '.parquet')
DOWNLOAD_RETRIES = 4        # per source shard, 1+2+4+8 s apart
BATCH_BYTES = 1 << 20       # documents go to the tokenizer processes in batches of about this many bytes
STATE = 'stream_state.json'  # an unfinished run's progress; removed once meta.json is written
HASHES = 'stream_hashes.bin'  # the kept documents' hashes, 16 bytes each, so that a resumed run drops the same
OUTPUT_FILE = re.compile(r'((?:val|train_\d{5,})\.bin)(\.tmp)?')


class DamagedShard(Exception):
    pass


def is_url(s):
    return s.startswith(('http://', 'https://'))


def shard_ext(source):
    """'.json.gz' for 'https://host/c4-train.00000-of-01024.json.gz?download=true'; None if not a shard."""
    name = source.split('?')[0].lower()
    return next((ext for ext in SHARD_EXTS if name.endswith(ext)), None)


def stream_sources(cfg):
    """(the source shards in order, URLs or local paths; the source as meta.json records it)."""
    if not cfg.input and cfg.dataset in SHARD_PATTERNS:
        pattern, n = SHARD_PATTERNS[cfg.dataset]
        return [pattern.format(i) for i in range(n)], f'{pattern} for 0..{n - 1}'
    spec = cfg.input or (DOLMA_URLS if cfg.dataset == 'dolma' else '')
    if not spec:
        raise UserError("--dataset=urls needs --input: a file (local or a URL) listing .jsonl(.gz) or .txt(.gz) "
                        "URLs or paths one per line, or a comma-separated list of them")
    sources = [s.strip() for s in spec.split(',') if s.strip()]
    if len(sources) == 1 and shard_ext(sources[0]) in (None, '.txt'):  # a list of shards
        sources = read_shard_list(sources[0], cfg)
    for s in sources:
        if not shard_ext(s):
            raise UserError(f"'{s}' is not a {', '.join(SHARD_EXTS)} file; for one list of shards give "
                            f"--input=LIST (one per line), for several shards --input=A,B,C")
        if not is_url(s) and not os.path.isfile(s):
            raise UserError(f"source shard '{s}' not found")
    return sources, spec


def read_shard_list(where, cfg):
    """The shards a text file (local or a URL) lists one per line; relative entries are relative to the list."""
    if is_url(where):
        try:
            path = cached_download(where, cfg.cache_dir, cfg.timeout, DOWNLOAD_RETRIES)
        except DownloadError as e:
            raise UserError(f"could not download the list of shards {where} ({e})") from None
    elif os.path.isfile(where):
        path = where
    else:
        raise UserError(f"input '{where}' not found: give a file that lists shard URLs or paths, one per line")
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]
    for i, line in enumerate(lines):
        if not shard_ext(line):
            raise UserError(f"line {i + 1} of '{where}' ({line[:60]!r}) is not a shard URL or path: one .txt "
                            f"--input is read as a list of shards (for a text file use --dataset=text)")
    if not lines:
        raise UserError(f"'{where}' lists no shards")
    if is_url(where):
        return [urljoin(where, line) for line in lines]
    return [line if is_url(line) else os.path.join(os.path.dirname(where), line) for line in lines]


def fetch_source(source, cfg):
    """Local path of a source shard: the path itself, or the URL's download in cache_dir."""
    if not is_url(source):
        return source
    try:
        return cached_download(source, cfg.cache_dir, cfg.timeout, DOWNLOAD_RETRIES)
    except DownloadError as e:
        raise UserError(f"could not download {source} ({e})") from None


def parquet_module(what):
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{what} are parquet files, which need pyarrow: `pip install pyarrow` (or give "
                        f"--input=a list of .jsonl.gz shards)") from None
    return pyarrow.parquet


def read_records(path):
    """The raw records of one source shard, in order: the lines of a .jsonl/.json file (bytes), the text of a
    .txt file (str; None if it is not UTF-8), the "text" column of a .parquet file (str). Streams: one line or
    one parquet row group in memory at a time."""
    ext = shard_ext(path)
    try:
        if ext == '.parquet':
            try:
                for batch in parquet_module(path).ParquetFile(path).iter_batches(columns=['text']):
                    yield from batch.column(0).to_pylist()
            except (ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DamagedShard(f'not a parquet file with a "text" column: {e}') from None
            return
        with (gzip.open if ext.endswith('.gz') else open)(path, 'rb') as f:
            if ext.startswith('.txt'):
                try:
                    yield f.read().decode('utf-8-sig')
                except UnicodeDecodeError:
                    yield None
                return
            for line in f:
                if line.strip():
                    yield line
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt gzip file
        raise DamagedShard(str(e) or type(e).__name__) from None


def record_batches(records):
    """Lists of records of about BATCH_BYTES each."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record or '')
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordinary_encoder(tokenizer):
    """(encode(str) -> token ids, whether a document is encoded whole) for a meta['tokenizer'] dict, with special
    tokens' text read as plain text."""
    if tokenizer.get('kind') == 'tiktoken':
        return tiktoken_encoding(tokenizer['name']).encode_ordinary, False
    if tokenizer.get('kind') == 'bpe' and 'model' in tokenizer:
        tok = bpe_from_text(tokenizer['model'], 'the bpe tokenizer in meta')
        return bpe_encoder(tok), isinstance(tok, bpe.SentencePieceBPE)
    raise UserError(f"the streaming datasets cannot use tokenizer {tokenizer!r}")


_worker = {}  # this process's encode function, whether documents are encoded whole, and min_chars: init_worker


def init_worker(tokenizer, min_chars):
    """Set up a tokenizer process: the encoder is built here from its description, so it need not pickle."""
    if multiprocessing.parent_process():  # a pool process: Ctrl-C is for the main process to handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    encode, whole = ordinary_encoder(tokenizer)
    _worker.update(encode=encode, whole=whole, min_chars=max(min_chars, 1))


def encode_batch(records):
    """([(hash, tokens) per record], bytes of text tokenized). The hash is None for a record without text, and
    tokens is None for a text shorter than min_chars; otherwise tokens is a uint32 array."""
    encode, min_chars = _worker['encode'], _worker['min_chars']
    results, nbytes = [], 0
    for record in records:
        text = jsonl_text(record) if isinstance(record, bytes) else record
        if text is None:
            results.append((None, None))
        elif len(text.strip()) < min_chars:
            results.append((b'', None))
        else:
            raw = text.encode('utf-8')
            tokens = np.concatenate([np.asarray(encode(piece), dtype=np.uint32)
                                     for piece in ([text] if _worker['whole'] else pieces(text))])
            results.append((hashlib.blake2b(raw, digest_size=16).digest(), tokens))
            nbytes += len(raw)
    return results, nbytes


def encoded_batches(path, pool, ahead):
    """encode_batch's results for one source shard, in order, by the pool's processes (or this one if None).
    Not pool.imap: it reads all its input at once; here at most `ahead` batches are in flight."""
    batches = record_batches(read_records(path))
    if pool is None:
        yield from map(encode_batch, batches)
        return
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_batch, (batch,)))
        if len(pending) > ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class TokenWriter:
    """Appends documents' tokens, eot between documents, to val.bin until it holds val_tokens (whole documents),
    then to train_00000.bin, train_00001.bin, ... of shard_tokens each, and stops at max_tokens in all (0: no
    limit). Files are written as NAME.tmp; commit() renames the complete ones, restore() goes back to a commit."""

    def __init__(self, out_dir, dtype, eot, val_tokens, shard_tokens, max_tokens):
        self.out_dir, self.dtype, self.eot = out_dir, dtype, eot
        self.val_tokens, self.shard_tokens, self.max_tokens = val_tokens, shard_tokens, max_tokens
        self.n = {'val': 0, 'train': 0}  # tokens written to each split
        self.file = None  # (name, open file) being appended to

    def total(self):
        return self.n['val'] + self.n['train']

    def files(self, final=False):
        """[(name, tokens, complete)] for the files that hold what was written; with final, all are complete."""
        files = [('val.bin', self.n['val'], final or self.n['val'] >= self.val_tokens)] if self.n['val'] else []
        for start in range(0, self.n['train'], self.shard_tokens):
            tokens = min(self.shard_tokens, self.n['train'] - start)
            files.append((f'train_{start // self.shard_tokens:05d}.bin', tokens, final or tokens == self.shard_tokens))
        return files

    def add(self, tokens):
        """Append one document; False once max_tokens are written (the last document may be cut short)."""
        split = 'val' if self.n['val'] < self.val_tokens else 'train'
        if self.n[split]:
            tokens = np.concatenate(([self.eot], tokens))
        if self.max_tokens:
            tokens = tokens[:self.max_tokens - self.total()]
        while len(tokens):
            if split == 'val':
                name, room = 'val.bin', len(tokens)
            else:
                shard, offset = divmod(self.n['train'], self.shard_tokens)
                name, room = f'train_{shard:05d}.bin', self.shard_tokens - offset
            if not self.file or self.file[0] != name:
                self.close()
                self.file = (name, open(os.path.join(self.out_dir, name + '.tmp'), 'ab'))
            self.file[1].write(tokens[:room].astype(self.dtype).tobytes())
            self.n[split] += len(tokens[:room])
            tokens = tokens[room:]
        return not self.max_tokens or self.total() < self.max_tokens

    def close(self):
        if self.file:
            self.file[1].flush()
            os.fsync(self.file[1].fileno())
            self.file[1].close()
            self.file = None

    def commit(self, final=False):
        """Make what was written durable and rename the complete files (with final: all files) to NAME."""
        self.close()
        for name, _, complete in self.files(final):
            path = os.path.join(self.out_dir, name)
            if complete and os.path.exists(path + '.tmp'):
                os.replace(path + '.tmp', path)

    def restore(self, n):
        """Cut out_dir's files back to a committed position n ({'val': tokens, 'train': tokens}), named as
        commit() left them; what was written after it is dropped. False if a file is missing or too short."""
        self.n = dict(n)
        want = {name: (tokens, complete) for name, tokens, complete in self.files()}
        for f in os.listdir(self.out_dir):
            m = OUTPUT_FILE.fullmatch(f)
            if m and m[1] not in want:
                os.remove(os.path.join(self.out_dir, f))
        for name, (tokens, complete) in want.items():
            path = os.path.join(self.out_dir, name)
            found = [p for p in (path, path + '.tmp') if os.path.exists(p)]
            if not found or os.path.getsize(found[0]) < tokens * self.dtype.itemsize:
                return False
            for extra in found[1:]:
                os.remove(extra)
            os.truncate(found[0], tokens * self.dtype.itemsize)
            os.replace(found[0], path if complete else path + '.tmp')
        return True


def clear_stream_output(out_dir):
    """Remove a dataset from out_dir (meta.json first, so it never looks complete): a fresh start."""
    for name in ['meta.json'] + sorted(os.listdir(out_dir)):
        if name in ('meta.json', 'meta.json.tmp', 'train.bin', 'val.bin', STATE, STATE + '.tmp', HASHES) or \
                OUTPUT_FILE.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))


def resume_stream(out_dir, run, writer):
    """(document counts, hashes of the kept documents, source shards done) where an interrupted run with the
    same settings stopped, with writer restored to that point; for anything else, a cleared out_dir and zeros."""
    try:
        with open(os.path.join(out_dir, STATE)) as f:
            state = json.load(f)
        if state['run'] == run and writer.restore(state['written']):
            size = 16 * state['documents']['kept']
            with open(os.path.join(out_dir, HASHES), 'r+b') as f:
                f.truncate(size)
                raw = f.read()
            if len(raw) == size:
                return state['documents'], {raw[i:i + 16] for i in range(0, size, 16)}, state['sources_done']
        print(f"{out_dir} holds an unfinished run with other settings or damaged files: starting over")
    except (OSError, ValueError, KeyError, TypeError):  # no state file: a new run
        pass
    writer.n = {'val': 0, 'train': 0}
    clear_stream_output(out_dir)
    return {'seen': 0, 'kept': 0, 'duplicates': 0, 'too_short': 0, 'bad': 0}, set(), 0


def save_progress(out_dir, writer, new_hashes, state):
    """Checkpoint after a source shard: the output files, then the new hashes, then the state that names both."""
    writer.commit()
    with open(os.path.join(out_dir, HASHES), 'ab') as f:
        f.write(b''.join(new_hashes))
        f.flush()
        os.fsync(f.fileno())
    write_atomic(os.path.join(out_dir, STATE), json.dumps(state))


def token_count(cfg, key, least):
    value = getattr(cfg, key)
    if value != int(value) or value < least:
        raise UserError(f"{key} must be a whole number of tokens of at least {least}, e.g. --{key}=1e6, not {value}")
    return int(value)


def add_source(path, pool, ahead, writer, hashes, docs, bar):
    """Tokenize one source shard into writer, dropping documents without text, short ones and repeats (counted
    in docs; hashes holds the kept ones'). Returns (new hashes, bytes of text tokenized, max_tokens reached)."""
    new_hashes, text_bytes = [], 0
    for results, nbytes in encoded_batches(path, pool, ahead):
        text_bytes += nbytes
        for digest, tokens in results:
            docs['seen'] += 1
            if digest is None:
                docs['bad'] += 1
            elif tokens is None:
                docs['too_short'] += 1
            elif digest in hashes:
                docs['duplicates'] += 1
            else:
                hashes.add(digest)
                new_hashes.append(digest)
                docs['kept'] += 1
                if not writer.add(tokens):
                    return new_hashes, text_bytes, True
        bar.update(writer.total() - bar.n)
    return new_hashes, text_bytes, False


def stream_already_prepared(out_dir, run):
    """The existing meta.json if out_dir holds complete data made with the same settings from the same shards."""
    meta = complete_meta(out_dir)
    return meta if meta is not None and all(meta.get(k) == v for k, v in run.items()) else None


def prepare_stream(cfg):
    """Write cfg.out_dir/{val.bin, train_00000.bin, ..., meta.json} from a streaming dataset's source shards,
    continuing an interrupted run of the same command. Returns meta."""
    val_tokens, shard_tokens = token_count(cfg, 'val_tokens', 1), token_count(cfg, 'shard_tokens', 1)
    max_tokens = token_count(cfg, 'max_tokens', 0)
    if max_tokens and max_tokens <= val_tokens:
        raise UserError(f"max_tokens ({max_tokens:,}) must be more than val_tokens ({val_tokens:,})")
    if cfg.tokenizer == 'char':
        raise UserError("the streaming datasets need a fixed vocabulary: use --tokenizer=gpt2 (the default) or "
                        "--tokenizer=bpe --tokenizer_path=FILE")
    if cfg.num_proc < 0:
        raise UserError(f"num_proc must be 0 (one per CPU core) or more, not {cfg.num_proc}")
    num_proc = cfg.num_proc or os.cpu_count() or 1
    sources, source = stream_sources(cfg)
    if any(shard_ext(s) == '.parquet' for s in sources):
        parquet_module(f"{cfg.dataset}'s shards")  # fail before any download
    if cfg.tokenizer == 'bpe':
        bpe_tok, model_text, tokenizer = bpe_for(cfg, cfg.dataset, [])
        n_vocab, eot = bpe_tok.vocab_size, separator(bpe_tok, 'the tokenizer')
        worker_tokenizer = {**tokenizer, 'model': model_text}  # the workers build their encoder from the text
    else:
        tokenizer = worker_tokenizer = {'kind': 'tiktoken', 'name': 'gpt2'}
        enc = tiktoken_encoding(tokenizer['name'])
        n_vocab, eot, model_text = enc.n_vocab, enc.eot_token, None
    dtype = np.dtype(np.uint16 if n_vocab <= 65536 else np.uint32)
    settings = {'sources_sha256': hashlib.sha256('\n'.join(sources).encode()).hexdigest(), 'val_tokens': val_tokens,
                'shard_tokens': shard_tokens, 'max_tokens': max_tokens, 'min_chars': cfg.min_chars}
    run = {'dataset': cfg.dataset, 'vocab_size': n_vocab, 'dtype': dtype.name, 'tokenizer': tokenizer,
           'eot_token': eot, 'source': source, 'settings': settings, 'prepare_version': PREPARE_VERSION}
    old = stream_already_prepared(cfg.out_dir, run)
    if old:
        print(f"already prepared: {cfg.out_dir} holds {cfg.dataset}, {old['train_tokens']:,} train tokens in "
              f"{len(old['train_shards'])} shards and {old['val_tokens']:,} val tokens")
        return old

    os.makedirs(cfg.out_dir, exist_ok=True)
    writer = TokenWriter(cfg.out_dir, dtype, eot, val_tokens, shard_tokens, max_tokens)
    docs, hashes, done = resume_stream(cfg.out_dir, run, writer)
    if done:
        print(f"resuming: {done} of {len(sources)} source shards were done, {writer.total():,} tokens written")
    init_worker(worker_tokenizer, cfg.min_chars)  # num_proc=1 tokenizes in this process
    pool = multiprocessing.Pool(num_proc, init_worker, (worker_tokenizer, cfg.min_chars)) if num_proc > 1 else None
    start, text_bytes, full, i = time.time(), 0, False, done - 1
    bar = tqdm(total=max_tokens or None, initial=writer.total(), unit='tok', unit_scale=True, desc='tokens',
               disable=None)
    with pool or contextlib.nullcontext(), bar:
        while not full and i + 1 < len(sources):
            i += 1
            path = fetch_source(sources[i], cfg)
            try:
                new_hashes, nbytes, full = add_source(path, pool, 2 * num_proc, writer, hashes, docs, bar)
            except DamagedShard as e:
                if is_url(sources[i]):
                    os.remove(path)  # so that the next run downloads it again
                raise UserError(f"source shard {sources[i]} is damaged ({e}); " + (
                    "its download was deleted: run the same command again to fetch it anew" if is_url(sources[i])
                    else "replace the file or leave it out")) from None
            text_bytes += nbytes
            if not full:
                save_progress(cfg.out_dir, writer, new_hashes, {'run': run, 'sources_done': i + 1,
                                                                'written': writer.n, 'documents': docs})
                tqdm.write(f'{i + 1}/{len(sources)} source shards, {writer.total():,} tokens: {sources[i]}')
                if is_url(sources[i]) and not cfg.keep_downloads:
                    os.remove(path)
    seconds = time.time() - start
    writer.commit(final=True)
    if writer.n['train'] < MIN_SPLIT_TOKENS:
        raise UserError(f"only {writer.total():,} tokens in {docs['kept']:,} documents, and val.bin takes the first "
                        f"{val_tokens:,}: lower --val_tokens or give more shards")
    meta = {k: run[k] for k in ('dataset', 'vocab_size', 'dtype', 'tokenizer', 'eot_token')}
    meta.update(train_tokens=writer.n['train'], val_tokens=writer.n['val'],
                train_shards=[{'file': name, 'tokens': n} for name, n, _ in writer.files() if name != 'val.bin'],
                documents=docs, source=source, source_shards_read=i + 1, settings=settings,
                prepare_version=PREPARE_VERSION)
    if model_text:
        write_atomic(os.path.join(cfg.out_dir, TOKENIZER_FILE), model_text)
    write_atomic(os.path.join(cfg.out_dir, 'meta.json'), meta_json(meta))
    for name in (STATE, HASHES):
        with contextlib.suppress(FileNotFoundError):  # none if it stopped in the first source shard
            os.remove(os.path.join(cfg.out_dir, name))
    if full and is_url(sources[i]) and not cfg.keep_downloads:
        os.remove(path)  # the shard it stopped in
    print(f"wrote {cfg.out_dir}: {cfg.dataset}, {tokenizer.get('name')} tokenizer, {meta['val_tokens']:,} val and "
          f"{meta['train_tokens']:,} train tokens in {len(meta['train_shards'])} shards ({meta['dtype']})\n"
          f"documents: {', '.join(f'{v:,} {k}' for k, v in docs.items())}; tokenized {text_bytes / 1e6:,.1f} MB "
          f"of text in {seconds:.1f} s ({text_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s, {num_proc} processes)")
    return meta


def main(argv):
    return prepare(parse_config(PrepareConfig, argv), fallback=not argv)


if __name__ == '__main__':
    run_cli(main)

"""
Turn text into the token files train.py reads: out_dir/train.bin, out_dir/val.bin and out_dir/meta.json.

    python prepare.py                                    # Tiny Shakespeare, characters (offline: see below)
    python prepare.py --dataset=shakespeare              # the same text, GPT-2 BPE tokens
    python prepare.py --input=input.txt                  # a local copy of Tiny Shakespeare, no download
    python prepare.py --dataset=pydocs                   # offline: Python's own help texts and docstrings
    python prepare.py --dataset=text --input=notes/ --tokenizer=gpt2 --out_dir=data/notes

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
"""
import glob
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import warnings
from dataclasses import dataclass

import numpy as np
import requests
import tiktoken
from tqdm import tqdm

from train import UserError, parse_config, run_cli

PREPARE_VERSION = 1  # bump when the output for the same input changes; older data is then rebuilt
DATASETS = ('shakespeare_char', 'shakespeare', 'text', 'pydocs')
TEXT_EXTS = ('.txt', '.md', '.jsonl')
MIN_SPLIT_TOKENS = 2  # each split needs at least one (input, target) pair
SEPARATOR = {'char': '\n\n', 'gpt2': '<|endoftext|>'}  # between documents; for gpt2 this is one token, eot
PYDOCS_SOURCE = f'pydoc_data.topics and stdlib docstrings (Python {platform.python_version()})'


@dataclass
class PrepareConfig:
    dataset: str = 'shakespeare_char'  # shakespeare_char | shakespeare | text | pydocs
    out_dir: str = ''                  # '' = data/<dataset>
    input: str = ''                    # a local file instead of the download; for text: a file, folder or glob
    tokenizer: str = ''                # char | gpt2; '' = gpt2 for shakespeare, char for the others
    val_fraction: float = 0.1          # the last this much of the text is the validation split
    url: str = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    cache_dir: str = 'data/.cache'     # downloads are kept here and not fetched again
    timeout: float = 30.0              # seconds to wait for the download server


class DownloadError(Exception):
    pass

# ----------------------------------------------------------------------------------------------------------
# getting the text: a list of documents


def download(url, cache_dir, timeout):
    """Path of a cached copy of url, downloading it first if needed (to a temp file, renamed when complete)."""
    name = hashlib.sha1(url.encode()).hexdigest()[:10] + '-' + (os.path.basename(url.split('?')[0]) or 'index')
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        return path
    tmp = path + '.part'
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            os.makedirs(cache_dir, exist_ok=True)
            size = int(r.headers.get('content-length', 0)) or None
            bar = tqdm(total=size, unit='B', unit_scale=True, desc='download', disable=None)  # None: only on a tty
            with open(tmp, 'wb') as f, bar:
                for chunk in r.iter_content(1 << 16):
                    bar.update(f.write(chunk))
    except (requests.RequestException, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DownloadError(short_reason(e)) from None
    os.replace(tmp, path)
    return path


def short_reason(e):
    """'Connection refused' rather than requests' three-line 'HTTPConnectionPool(host=...) Max retries...'."""
    if isinstance(e, requests.HTTPError):
        return f'HTTP {e.response.status_code}'
    if isinstance(e, requests.Timeout):
        return 'timed out'
    m = re.search(r'\[Errno -?\d+\] ([^\'")]+)', str(e))  # e.g. [Errno -2] Name or service not known
    return m.group(1).strip() if m else type(e).__name__


def decode_file(path):
    """(text, None) for a UTF-8 text file, else (None, why not)."""
    with open(path, 'rb') as f:
        raw = f.read()
    if b'\x00' in raw:
        return None, 'contains NUL bytes, so it looks binary'
    try:
        return raw.decode('utf-8-sig'), None  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        return None, f'is not UTF-8 (bad byte at offset {e.start})'


def find_files(pattern):
    """The files --input names: one file, the .txt/.md/.jsonl files under a folder, or a glob's matches."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names
                       if f.lower().endswith(TEXT_EXTS))
        if not files:
            raise UserError(f"no {', '.join(TEXT_EXTS)} files in folder '{pattern}'")
        return files
    if os.path.isfile(pattern):
        return [pattern]
    if any(c in pattern for c in '*?['):
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"no files match '{pattern}'")
        return files
    raise UserError(f"input '{pattern}' not found: give a file, a folder or a glob such as 'notes/**/*.md'")


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
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict) and isinstance(record.get('text'), str):
                    # JSON can hold half an emoji (a lone surrogate), which no encoder takes: make it U+FFFD
                    docs.append(record['text'].encode('utf-8', 'surrogatepass').decode('utf-8', 'replace'))
                else:
                    bad_records += 1
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


def tiktoken_encoding(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads its files once, then reads them from its cache
        raise UserError(f"could not load tiktoken's {name} encoding ({short_reason(e)}); it is downloaded once, "
                        f"so connect to the internet or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


def load_tokenizer(meta):
    """encode(str) -> list[int] and decode(list[int]) -> str for a dataset's meta.json dict."""
    tok = meta.get('tokenizer') or {}
    if tok.get('kind') == 'char':
        chars = tok['chars']
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(s):
            for c in s:
                if c not in stoi:
                    raise UserError(f"character {c!r} is not in this dataset's vocabulary of {len(chars)} "
                                    f"characters; leave it out of the prompt")
            return [stoi[c] for c in s]

        def decode(ids):  # a model's vocabulary may be padded past the data's: show those ids as U+FFFD
            return ''.join(chars[i] if 0 <= i < len(chars) else '\ufffd' for i in ids)
        return encode, decode
    if tok.get('kind') == 'tiktoken':
        enc = tiktoken_encoding(tok['name'])
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'}),
                lambda ids: enc.decode([i for i in ids if 0 <= i < enc.n_vocab], errors='replace'))
    raise UserError(f"meta.json has an unknown tokenizer {tok!r}; re-run prepare.py for this dataset")


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


def encode_documents(docs, encode, sep, desc):
    """One array of the documents' tokens with sep (a token list) between documents."""
    parts = []
    with tqdm(total=sum(map(len, docs)), unit='char', unit_scale=True, desc=desc, disable=None) as bar:
        for i, doc in enumerate(docs):
            if i:
                parts.append(np.asarray(sep, dtype=np.int64))
            for piece in pieces(doc):
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
            path = download(cfg.url, cfg.cache_dir, cfg.timeout)
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


def tokenize(docs, kind, val_fraction):
    """Split the documents into train and val text, then tokenize each. Returns ({split: tokens}, meta fields)."""
    sep_text = SEPARATOR[kind]
    if kind == 'char':
        chars = sorted((set(sep_text) if len(docs) > 1 else set()).union(*map(set, docs)))
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, so searchsorted gives each id
        encode = lambda s: np.searchsorted(codes, np.frombuffer(s.encode('utf-32-le'), dtype=np.uint32))
        sep, info = encode(sep_text), {'vocab_size': len(chars), 'tokenizer': {'kind': 'char', 'chars': chars},
                                       'eot_token': None}
    else:
        enc = tiktoken_encoding('gpt2')
        encode, sep = enc.encode_ordinary, [enc.eot_token]
        info = {'vocab_size': enc.n_vocab, 'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'},
                'eot_token': enc.eot_token}
    dtype = np.uint16 if info['vocab_size'] <= 65536 else np.uint32
    info['dtype'] = np.dtype(dtype).name
    splits = {}
    for name, part in zip(('train', 'val'), split_documents(docs, val_fraction)):
        splits[name] = encode_documents(part, encode, sep, f'tokenizing {name}').astype(dtype)
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


def already_prepared(out_dir, expect):
    """The existing meta.json if out_dir holds complete data made from the same text with the same settings."""
    try:
        with open(os.path.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta['dtype']).itemsize
        sizes = [os.path.getsize(os.path.join(out_dir, f'{s}.bin')) for s in ('train', 'val')]
        if sizes != [meta['train_tokens'] * itemsize, meta['val_tokens'] * itemsize]:
            return None
        got = {**meta, 'tokenizer': meta['tokenizer']['kind']}  # a char vocabulary follows from the text
    except (OSError, ValueError, KeyError, TypeError):  # missing, damaged or from another program
        return None
    return meta if all(got.get(k) == v for k, v in expect.items()) else None


def save_split(tokens, path):
    tokens.tofile(path)


def prepare(cfg, fallback=False):
    """Write cfg.out_dir/{train.bin, val.bin, meta.json}, unless they already hold this data. Returns meta."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{cfg.dataset}'; choose one of {', '.join(DATASETS)}")
    if cfg.tokenizer not in ('', 'char', 'gpt2'):
        raise UserError(f"tokenizer must be char or gpt2, not '{cfg.tokenizer}'")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (e.g. 0.1), not {cfg.val_fraction}")
    cfg.out_dir = cfg.out_dir or os.path.join('data', cfg.dataset)
    dataset, docs, source = load_corpus(cfg, fallback)
    kind = cfg.tokenizer or ('gpt2' if dataset == 'shakespeare' else 'char')
    expect = {'dataset': dataset, 'sha256': text_sha256(docs, kind), 'val_fraction': cfg.val_fraction,
              'prepare_version': PREPARE_VERSION, 'tokenizer': 'char' if kind == 'char' else 'tiktoken'}
    old = already_prepared(cfg.out_dir, expect)
    if old:
        print(f"already prepared: {cfg.out_dir} holds {dataset} ({kind}), {old['train_tokens']:,} train and "
              f"{old['val_tokens']:,} val tokens")
        return old

    splits, info = tokenize(docs, kind, cfg.val_fraction)
    meta = {'dataset': dataset, **info, 'train_tokens': len(splits['train']), 'val_tokens': len(splits['val']),
            'val_fraction': cfg.val_fraction, 'source': source, 'sha256': expect['sha256'],
            'prepare_version': PREPARE_VERSION}
    # everything goes to temporary names first; the old meta.json is removed before the renames and the new
    # one comes last, so out_dir always holds either a complete dataset or no meta.json at all
    os.makedirs(cfg.out_dir, exist_ok=True)
    names = ('train.bin', 'val.bin', 'meta.json')
    tmp = {name: os.path.join(cfg.out_dir, name + '.tmp') for name in names}
    try:
        save_split(splits['train'], tmp['train.bin'])
        save_split(splits['val'], tmp['val.bin'])
        with open(tmp['meta.json'], 'w') as f:  # one key per line, the character list on one line
            f.write('{\n' + ',\n'.join(f' {json.dumps(k)}: {json.dumps(v)}' for k, v in meta.items()) + '\n}\n')
        if os.path.exists(os.path.join(cfg.out_dir, 'meta.json')):
            os.remove(os.path.join(cfg.out_dir, 'meta.json'))
        for name in names:
            os.replace(tmp[name], os.path.join(cfg.out_dir, name))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    print(f"wrote {cfg.out_dir}: {dataset}, {kind} tokenizer, vocab {meta['vocab_size']:,}, "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']})")
    return meta


def main(argv):
    return prepare(parse_config(PrepareConfig, argv), fallback=not argv)


if __name__ == '__main__':
    run_cli(main)

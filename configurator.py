"""
The command line and the files around it, in the standard library only (requests is imported by download
alone), so that prepare.py runs without torch and every script shares one way of doing each of these:

- settings: a dataclass's defaults < Python config files < --key=value, every key and type checked
  (parse_config), ranges (check_ranges), output paths (writable_dir, writable_file);
- errors: UserError is printed by run_cli as one line, without a traceback, with exit status 2;
- files: atomic_write (a crash never leaves half a file), decode_file (UTF-8 text or why not), list_files (one
  walker: a file, a folder or a glob, never following links out of it or around in loops), jsonl_lines, and
  download (cached, resumable with HTTP Range requests).
"""
import ast
import contextlib
import difflib
import hashlib
import json
import os
import re
import sys
import time
import types
import typing
from dataclasses import asdict, fields


class UserError(Exception):
    """A mistake in the user's input: printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# settings: defaults < config files < --key=value, every key and type checked

def _check_value(cls, key, value, source):
    """Return value converted to the type of cls.key, or raise UserError naming the key."""
    names = [f.name for f in fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
        raise UserError(f"unknown config key '{key}' ({source}){hint}")
    typ = typing.get_type_hints(cls)[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if typ is bool and isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' ({source}) must be {typ.__name__}, got {value!r} "
                        f"({type(value).__name__}); e.g. --{key}={getattr(cls(), key)!r}")
    return value


def parse_config(cls, argv, base=None):
    """A cls instance from defaults (or base), then config files, then --key=value, in the order given."""
    cfg = base if base is not None else cls()
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                raise UserError(f"argument '{arg}' must look like --{key}=VALUE")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --out_dir=out-x
            if typing.get_type_hints(cls).get(key) is str and not isinstance(value, str):
                value = raw  # --out_dir=123 is the string '123'
            setattr(cfg, key, _check_value(cls, key, value, 'command line'))
        else:
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' not found (config files are Python files; "
                                f"overrides are written --key=value)")
            namespace = {}
            with open(arg) as f:
                try:
                    exec(compile(f.read(), arg, 'exec'), namespace)
                except Exception as e:
                    raise UserError(f"config file '{arg}' failed to run: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                setattr(cfg, key, _check_value(cls, key, value, arg))
    return cfg


def check_ranges(cfg, positive=(), non_negative=(), fractions=()):
    """One line naming the first key out of its range: positive ones > 0, non-negative ones >= 0 (0 means
    'off' or 'default' for them), fractions in [0, 1)."""
    for keys, ok, what in ((positive, lambda v: v > 0, '> 0'), (non_negative, lambda v: v >= 0, '>= 0'),
                           (fractions, lambda v: 0 <= v < 1, 'in [0, 1)')):
        for key in keys:
            value = getattr(cfg, key)
            if not ok(value) or value != value:  # value != value: NaN
                raise UserError(f"{key} must be {what}, not {value!r}: e.g. --{key}={getattr(type(cfg)(), key)!r}")


def writable_dir(path, key):
    """One line when path cannot become a folder: a file is there already, or where a parent folder should be."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key}='{path}' is a file, not a folder: pick another --{key}")
    _parent_folders(path, key)


def writable_file(path, key):
    """One line when path cannot be written as a file: a folder is there, or a file where a parent should be."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{key}='{path}' is a folder: give a file name, e.g. --{key}={os.path.join(path, 'out.json')}")
    _parent_folders(os.path.dirname(os.path.abspath(path)), key, path)


def _parent_folders(folder, key, path=None):
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{key}='{path or folder}' lies under '{folder}', which is a file, not a folder")


def print_config(cfg):
    changed = {k: v for k, v in asdict(cfg).items() if v != getattr(type(cfg)(), k)}
    print('config (changed from defaults): ' + (', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'none'))


def run_cli(main):
    """Run main(argv), printing a UserError as one line on stderr and exiting with status 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------
# files

@contextlib.contextmanager
def atomic_write(path, mode='w', **kwargs):
    """open() for writing, into path.tmp, renamed to path when the block ends: a crash or an error never leaves a
    half-written file under the real name (and the temporary file is removed)."""
    tmp = path + '.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # (writable_file has checked the way there)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_atomic(path, text):
    with atomic_write(path, 'wb') as f:
        f.write(text.encode('utf-8'))


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


def jsonl_lines(text, where, hint=''):
    """(line number, record) for each non-blank line of a JSONL text; UserError '<where>:<n> is not valid JSON'
    (where: the file's name) for a line that is not, with hint after it."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise UserError(f"{where}:{n} is not valid JSON ({getattr(e, 'msg', 'nested too deep')}){hint}") \
                    from None


def list_files(docs, extensions):
    """Files ending in one of extensions (None: any) under a folder, matching a glob (*, ** and ?), or the one file named:
    sorted paths ([] when the folder or glob has none). None when docs names no file, folder or glob. Links are not
    followed out of the folder (or the glob's fixed leading folder), nor around in loops."""
    docs = os.path.expanduser(docs)
    if os.path.isfile(docs):
        return [docs]
    if os.path.isdir(docs):
        paths = walk(docs)
    elif re.search(r'[*?]', docs):
        fixed = re.split(r'[*?]', docs, maxsplit=1)[0]
        root = os.path.dirname(fixed)
        match = glob_regex(os.path.join(root or '.', docs[len(root):].lstrip('/'))).fullmatch
        paths = [p for p in walk(root or '.') if match(p)] if os.path.isdir(root or '.') else []
        paths = paths if root else [os.path.relpath(p) for p in paths]  # 'a.md', not './a.md', as glob gives
    else:
        return None
    return sorted(p for p in paths if extensions is None or p.lower().endswith(tuple(extensions)))


def walk(root):
    """Files under root, hidden ones left out. os.walk does not enter links to folders (so no loops), and a link
    to a file counts when its target lies inside root and is not indexed already (no /etc/passwd, no duplicates)."""
    files, links = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in sorted(n for n in names if not n.startswith('.')):
            path = os.path.join(folder, name)
            (links if os.path.islink(path) else files).append(path)
    top, seen = os.path.realpath(root), {os.path.realpath(p) for p in files}
    for path in links:
        real = os.path.realpath(path)
        if real not in seen and os.path.commonpath([top, real]) == top and os.path.isfile(real):
            seen.add(real)
            files.append(path)
    return files


def glob_regex(pattern):
    # glob's meaning: ** any folders (also none), * and ? within one path part
    parts = {'**/': '(?:.*/)?', '**': '.*', '*': '[^/]*', '?': '[^/]'}
    return re.compile(''.join(parts.get(p) or re.escape(p) for p in re.split(r'(\*\*/?|\*|\?)', pattern)))


class DownloadError(Exception):
    """Why a download failed, in a few words; status: the HTTP status (None if no answer); answered: False when
    the server never answered (offline, a wrong address), so that callers can say so."""
    def __init__(self, reason, status=None, answered=True):
        super().__init__(reason)
        self.status, self.answered = status, answered


def download(url, dest, timeout=(10, 60), retries=0, headers=None):
    """Download url into the file dest unless it exists; returns dest. The bytes go to dest.part, renamed only when
    it holds all the Content-Length bytes. A broken transfer continues from where it stopped (an HTTP Range
    request): at once if bytes were arriving, after 1, 2, 4 ... s for a 5xx or 429, up to `retries` more times
    now, and otherwise from the .part on the next call. A 4xx, or a server that never answered, is not retried."""
    import requests
    if os.path.isfile(dest):
        return dest
    part, answered = dest + '.part', False
    for attempt in range(retries + 1):
        had = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            download_part(url, part, timeout, headers)
            break
        except (requests.RequestException, OSError, DownloadError) as e:
            response = getattr(e, 'response', None)
            status = response.status_code if response is not None else getattr(e, 'status', None)
            answered |= getattr(e, 'answered', True)
            if attempt == retries or not answered or status is not None and status < 500 and status != 429:
                raise DownloadError(short_reason(e), status, answered) from None
            if not (os.path.exists(part) and os.path.getsize(part) > had):  # nothing came: give the server time
                time.sleep(2 ** attempt)
    os.replace(part, dest)
    return dest


def cached_download(url, cache_dir, timeout, retries=0):
    """Path of url's copy in cache_dir (named by a hash of the URL and its file name), downloaded if need be."""
    name = hashlib.sha1(url.encode()).hexdigest()[:10] + '-' + (os.path.basename(url.split('?')[0]) or 'index')
    return download(url, os.path.join(cache_dir, name), timeout, retries)


def download_part(url, part, timeout, headers=None):
    """Fetch url into the file part, continuing after the bytes it already holds if the server takes Range."""
    import requests
    import urllib3
    from tqdm import tqdm
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {**(headers or {}), 'Accept-Encoding': 'identity'}  # the bytes as stored: Content-Length counts them
    if have:
        headers['Range'] = f'bytes={have}-'
    try:
        r = requests.get(url, stream=True, timeout=timeout, headers=headers)
    except requests.ConnectionError as e:  # no answer at all (a broken body raises later, from iter_content)
        raise DownloadError(short_reason(e), answered=False) from None
    with r:
        if r.status_code == 416 and have:  # asked for bytes past the end
            if r.headers.get('content-range') == f'bytes */{have}':
                return  # the .part was complete already
            os.remove(part)
            raise DownloadError('the partial download is longer than the file')
        r.raise_for_status()
        if r.status_code == 206 and not r.headers.get('content-range', '').startswith(f'bytes {have}-'):
            os.remove(part)
            raise DownloadError('the server sent another part of the file than asked for')
        have = have if r.status_code == 206 else 0  # 200: the server ignored Range and sends it all
        size = int(r.headers['content-length']) if 'content-length' in r.headers else None
        os.makedirs(os.path.dirname(part) or '.', exist_ok=True)
        bar = tqdm(total=size and have + size, initial=have, unit='B', unit_scale=True, disable=None,  # None: tty only
                   leave=False, desc=os.path.basename(url.split('?')[0])[:40])
        with open(part, 'ab' if have else 'wb') as f, bar:
            try:  # read1: what has arrived, so that a connection that breaks off loses nothing
                while chunk := r.raw.read1(1 << 16, decode_content=True):
                    bar.update(f.write(chunk))
            except urllib3.exceptions.HTTPError:
                raise DownloadError('the connection broke off before the end of the file') from None
        got = os.path.getsize(part) - have
        if size is not None and got != size and 'content-encoding' not in r.headers:
            raise DownloadError(f'received {got:,} of {size:,} bytes')


def short_reason(e):
    """'Connection refused' rather than requests' three-line 'HTTPConnectionPool(host=...) Max retries...'."""
    import requests
    if isinstance(e, requests.HTTPError):
        return f'HTTP {e.response.status_code}'
    if isinstance(e, requests.Timeout):
        return 'timed out'
    if isinstance(e, requests.exceptions.ChunkedEncodingError):  # e.g. fewer bytes than Content-Length
        return 'the connection broke off before the end of the file'
    if isinstance(e, DownloadError):
        return str(e)
    m = re.search(r'\[Errno -?\d+\] ([^\'")]+)', str(e))  # e.g. [Errno -2] Name or service not known
    return m.group(1).strip() if m else type(e).__name__


def tiktoken_encoding(name):
    try:
        import tiktoken
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads its files once, then reads them from its cache
        raise UserError(f"could not load tiktoken's {name} encoding ({short_reason(e)}); it is downloaded once, "
                        f"so connect to the internet or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None

"""
A chat page, a training-curves page and an OpenAI-compatible API, served by Python's standard library.

    python chat_ui.py --init_from=out-shakespeare-char                 # then open http://127.0.0.1:8000
    python chat_ui.py --init_from=gpt2 --quantize=int8 --rag_index=rag-index --port=8080 --api_key=secret

API: GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (stream, max_tokens,
temperature, top_p, top_k, stop, seed, n, usage), errors in OpenAI's JSON shape. Pages: / (chat, chat_ui.html) and
/train (chat_ui_train.html: plots out_dir/metrics.jsonl while a run goes on), read once at start-up.

One thread owns the model. Requests wait in a bounded queue (full: 429). Requests with the same sampling
settings are decoded together as one batch of rows. A client that disconnects, or presses stop on the page,
has its rows dropped at the next token, and when no row is left the batch stops.

Every client is treated as hostile: a request must name this server as its Host (and, from a browser, come
from this server's own page: no DNS rebinding, no cross-site requests), a body is JSON with a strict
Content-Length, every field is bounded before anything is queued, a client that stalls is dropped after
--timeout seconds, and every refusal is one line of OpenAI-shaped JSON that says what to do.
"""
import collections
import hmac
import json
import math
import os
import queue
import re
import reprlib
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import quantize
import rag
from configurator import UserError, parse_config, run_cli
from model import num_params, pack_linears
from train import chat_style, load_model, resolve_device, resolve_dtype, stream_text


@dataclass
class ServeConfig:
    init_from: str = 'out'          # train.py out_dir | gpt2 .. gpt2-xl | hf:org/name | Hugging Face folder
    host: str = '127.0.0.1'         # also the one Host name served besides 127.0.0.1, localhost, [::1]; 0.0.0.0: any
    port: int = 8000
    device: str = 'cpu'
    dtype: str = 'float32'          # on CPU fp32 with packed weights decodes fastest (bench.py decode)
    quantize: str = ''              # int8 | int4 | nf4 | dynamic: quantize the weights at start (quantize.py)
    rag_index: str = ''             # a rag.py index: the page's RAG toggle, and "rag": true in requests
    metrics_dir: str = ''           # the run whose metrics.jsonl /train plots; '' = init_from
    api_key: str = ''               # if set, all but /health, / and /train need "Authorization: Bearer <api_key>"
    model_name: str = ''            # the id /v1/models reports; '' = init_from's last path part
    max_batch: int = 8              # rows decoded together
    max_queue: int = 16             # requests waiting; more get 429
    max_body: int = 1 << 20         # request bytes; more get 413
    max_tokens: int = 256           # for requests that do not say
    seed: int = 1337
    trust_checkpoint: bool = False  # load checkpoints that need pickle (it can run code): trusted files only
    timeout: float = 30.0           # seconds a client may stall (sending a request, reading a reply): then dropped
    max_connections: int = 256      # open connections, each holding a thread; more are answered 503 and closed


# bounds on what one request may ask for
MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 200_000          # all messages together; far more than any context holds, which keeps the end
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings are looked for at every token: few and short
MAX_SEED = 2 ** 63                  # torch's generators take a 64-bit seed
GREEDY_BELOW = 1e-5                 # a smaller temperature overflows the logits to inf: decode greedily instead
POLL = 0.2                          # seconds between checks that a waiting client is still there
LOOPBACK = ('127.0.0.1', 'localhost', '[::1]')


class APIError(Exception):
    def __init__(self, status, message, kind='invalid_request_error', param=None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}

    def json(self):
        return {'error': {'message': str(self), 'type': self.kind, 'param': self.param, 'code': self.status}}


class ClientGone(ConnectionError):
    """The client closed its connection: there is no one left to answer."""


def shown(v, limit=80):
    """v as it can stand in a one-line message: a short printable string as it is, anything else cut short."""
    s = v if isinstance(v, str) and v.isprintable() else reprlib.repr(v)
    return s if len(s) <= limit else s[:limit] + '...'


# ----------------------------------------------------------------------------------------------------------
# the engine: one thread decodes batches of waiting requests

class Job:
    """One request: its prompt ids, n rows, and per row a queue of new token ids ending with ('end', reason)
    or ('error', message)."""

    def __init__(self, prompt, n, max_tokens, options):
        self.prompt, self.n, self.max_tokens, self.options = prompt, n, max_tokens, options
        self.out = [queue.Queue() for _ in range(n)]
        self.closed = [False] * n        # a row the reader no longer wants (stop string seen)
        self.cancelled = threading.Event()  # the client went away

    def rows(self, tok, stop, r, alive=lambda: True):
        """(text pieces of row r, state): state['tokens'] counts the tokens read and state['reason'] says why
        the row ended ('length', 'stop'); pieces stop before any stop string and the end-of-text token. The
        pieces raise APIError if decoding failed, and ClientGone if alive() says the client left meanwhile."""
        state = {'tokens': 0, 'reason': None}

        def steps():
            check = time.monotonic() + POLL
            while True:
                try:
                    item = self.out[r].get(timeout=POLL)
                except queue.Empty:
                    item = None
                if time.monotonic() >= check:  # every POLL s, tokens or not: is anyone still waiting for them?
                    check = time.monotonic() + POLL
                    if not alive():
                        self.cancelled.set()
                        raise ClientGone
                if item is None:
                    if self.cancelled.is_set():
                        raise APIError(503, "the server is stopping: retry later", 'server_error')
                    continue
                if isinstance(item, tuple):
                    if item[0] == 'error':
                        raise APIError(500, item[1], 'server_error')
                    state['reason'] = item[1]
                    return
                state['tokens'] += 1
                yield [item]

        def pieces():
            yield from stream_text(steps(), tok, stop)
            if state['reason'] is None:  # stream_text stopped first: end of text or a stop string
                state['reason'] = 'stop'
                self.closed[r] = True
        return pieces(), state


class Engine:
    def __init__(self, model, tok, max_batch, max_queue):
        self.model, self.tok, self.max_batch, self.max_queue = model, tok, max_batch, max_queue
        self.pending = collections.deque()
        self.cv = threading.Condition()
        self.running = 0   # rows being decoded now
        self.tokens = 0    # tokens decoded since start, and the most rows one batch had (for /health)
        self.widest = 0
        self.current, self.closing = [], False

    def close(self):
        """Cancel what waits and what runs: loop() returns after the current token."""
        with self.cv:
            self.closing = True
            for job in list(self.pending) + self.current:
                job.cancelled.set()
            self.cv.notify_all()

    def submit(self, job):
        with self.cv:
            if len(self.pending) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.pending)} requests are waiting; retry shortly",
                               'rate_limit_exceeded')
            self.pending.append(job)
            self.cv.notify()

    def take(self):
        # the oldest job, and those behind it that share its sampling options and fit in the batch
        with self.cv:
            while not self.pending and not self.closing:
                self.cv.wait()
            if self.closing:
                return None
            first = self.pending.popleft()
            batch, rows = [first], first.n
            for job in list(self.pending):
                if job.options == first.options and rows + job.n <= self.max_batch and first.options['seed'] is None:
                    self.pending.remove(job)
                    batch.append(job)
                    rows += job.n
            self.current = batch
            return batch

    def loop(self):
        """Decode batches until close(). Run it in the main thread: PyTorch's CPU kernels run ~15% slower when
        called from another thread (a thread pool of their own), and the HTTP threads only wait and write."""
        while (batch := self.take()) is not None:
            try:
                self.decode(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not stop the server
                for job in batch:
                    for q in job.out:
                        q.put(('error', failure(e)))
            finally:
                self.current = []

    @torch.no_grad()
    def decode(self, batch):
        owners = []
        for job in batch:
            for r in range(job.n):
                if job.cancelled.is_set():
                    job.out[r].put(('end', 'cancelled'))  # its client left while it waited
                else:
                    owners.append((job, r))
        if not owners:
            return
        opts = batch[0].options
        count, live = [0] * len(owners), [True] * len(owners)
        self.running, self.widest = len(owners), max(self.widest, len(owners))
        steps, error = None, None

        def end(i, item):
            job, r = owners[i]
            job.out[r].put(item)
            live[i] = False

        try:
            steps = self.model.generate_stream([job.prompt for job, _ in owners], max(j.max_tokens for j in batch),
                                               temperature=opts['temperature'], top_k=opts['top_k'],
                                               top_p=opts['top_p'], eos_id=self.tok.eos_id, seed=opts['seed'])
            for step in steps:
                for i, t in enumerate(step):
                    if not live[i]:
                        continue
                    job, r = owners[i]
                    if job.cancelled.is_set() or job.closed[r]:
                        end(i, ('end', 'cancelled'))
                    elif t is None:
                        end(i, ('end', 'stop'))
                    else:
                        job.out[r].put(t)
                        count[i] += 1
                        self.tokens += 1
                        if count[i] >= job.max_tokens:
                            end(i, ('end', 'length'))
                if not any(live):
                    break  # leaving the generator stops the decoding
        except Exception as e:  # noqa: BLE001 - the rows get the error as their answer, and the server goes on
            error = failure(e)
            print(f"chat_ui: {error}", file=sys.stderr)
            traceback.print_exc()
        finally:
            if hasattr(steps, 'close'):
                steps.close()  # now, in this thread: the generator's cleanup drops the model's KV caches
            for i in range(len(owners)):
                if live[i]:
                    end(i, ('error', error) if error else ('end', 'stop'))
            self.running = 0


def failure(e):
    return f"decoding failed ({type(e).__name__}: {shown(str(e), 200)}): retry; if it fails again, see the server's log"


# ----------------------------------------------------------------------------------------------------------
# requests: every field checked before a job is queued

def number(body, key, default, lo, hi, kind=float):
    """body[key] (default if absent or null), which must be a number (an integer if kind is int) in [lo, hi]."""
    v = body.get(key)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (kind is int and int(v) != v):
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}], "
                            f"got {shown(v)}", param=key)
    return kind(v)


NOT_FINITE = object()  # what NaN, Infinity and 1e400 parse to, so that the field holding one can be named


def parse_json(raw):
    """The request body as JSON, refusing NaN and infinities (Python's json takes them; JSON has no such
    numbers) and nesting too deep to parse, each as a 400."""
    bad = []

    def not_finite(text):
        bad.append(text)
        return NOT_FINITE

    try:
        body = json.loads(raw, parse_constant=not_finite,
                          parse_float=lambda s: float(s) if math.isfinite(float(s)) else not_finite(s))
    except RecursionError:
        raise APIError(400, "the body nests arrays or objects too deeply: send plain JSON") from None
    except ValueError as e:  # also bad UTF-8, and integers of more than 4300 digits
        raise APIError(400, f"the body is not valid JSON ({shown(str(e), 200)})") from None
    if bad:
        where = find(body, NOT_FINITE)
        raise APIError(400, f"'{where}' is {shown(bad[0])}: numbers must be finite", param=where)
    return body


def find(obj, target):
    """The path ('messages[0].content') of target in parsed JSON, walked without recursion."""
    todo = [(obj, '')]
    while todo:
        o, path = todo.pop()
        if o is target:
            return path or 'body'
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            todo.append((v, f'{path}[{k}]' if isinstance(o, list) else f'{path}.{k}' if path else str(k)))
    return 'body'


def stream_settings(body):
    """(stream, include_usage), checked now: once a stream has begun, a bad field can no longer be a 400."""
    stream = body.get('stream')
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param='stream')
    options = body.get('stream_options')
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object such as {\"include_usage\": true}",
                       param='stream_options')
    usage = (options or {}).get('include_usage')
    if usage is not None and not isinstance(usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be true or false",
                       param='stream_options.include_usage')
    return bool(stream), bool(usage)


class App:
    """The model, tokenizer, engine and settings the request handlers share."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pages = load_pages()
        device = resolve_device(cfg.device)
        model, tok = load_model(cfg.init_from, device, resolve_dtype(cfg.dtype, device), cfg.trust_checkpoint)
        if model.config.model_type == 'bert':
            raise UserError(f"'{cfg.init_from}' is a BERT encoder: chat needs a gpt or llama model")
        self.params = num_params(model, non_embedding=False)
        if cfg.quantize:
            try:
                quantize.quantize_model(model, cfg.quantize)
            except ValueError as e:
                raise UserError(str(e)) from None
        if device == 'cpu' and not cfg.quantize:
            pack_linears(model)
        # a character-level model drops characters it never saw instead of failing on them
        self.model, self.tok = model, tok.tolerant()
        self.style = chat_style(self.tok)  # its encode_prompt reads messages as text: no control tokens in them
        self.name = cfg.model_name or os.path.basename(os.path.normpath(cfg.init_from))
        self.block = model.config.block_size
        self.index = None
        if cfg.rag_index:
            self.index = rag.Index.load(cfg.rag_index)
            self.index.trust = cfg.trust_checkpoint
        self.engine = Engine(model, tok, cfg.max_batch, cfg.max_queue)
        self.created = int(time.time())
        # the Host names served: a browser pointed here by another name is a DNS-rebinding page
        host = cfg.host.lower()
        self.any_host = host in ('', '0.0.0.0', '::')
        self.hosts = set(LOOPBACK) | {f'[{host}]' if ':' in host else host}

    def options(self, body):
        seed = body.get('seed')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
            raise APIError(400, f"'seed' must be an integer in [0, 2**63), got {shown(seed)}", param='seed')
        temperature = number(body, 'temperature', 1.0, 0, 2)
        top_k = number(body, 'top_k', 0, 0, 10 ** 6, int)
        return dict(temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
                    top_p=number(body, 'top_p', 1.0, 0, 1) or 1.0, top_k=top_k or None, seed=seed)

    def stops(self, body, default=()):
        stop = body.get('stop')
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or \
                not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} strings, each of 1 to "
                                f"{MAX_STOP_CHARS} characters", param='stop')
        return stop + [s for s in default if s not in stop]

    def max_tokens(self, body):
        return number(body, 'max_tokens', min(self.cfg.max_tokens, self.block // 2), 1, self.block - 1, int)

    def job(self, body, prompt):
        """A Job for prompt as body asks, and the tokens cut from the prompt's left to fit the context. prompt: a
        completion's text (special tokens written in it are theirs), or chat messages (in the chat format, their
        content only ever text)."""
        max_tokens = self.max_tokens(body)
        n = number(body, 'n', 1, 1, self.cfg.max_batch, int)
        options = self.options(body)
        try:
            ids = self.tok.encode(prompt) if isinstance(prompt, str) else self.style.encode_prompt(prompt)
        except ValueError as e:  # e.g. a lone surrogate (\ud800) that no UTF-8 tokenizer takes
            raise APIError(400, f"the prompt cannot be encoded ({shown(str(e))}): send plain text",
                           param='prompt') from None
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param='prompt')
        room = self.block - min(max_tokens, self.block // 2)  # keep room to answer in the context
        cut = max(0, len(ids) - room)
        return Job(ids[cut:], n, max_tokens, options), cut, len(ids)

    def rag_prompt(self, messages, body):
        """The last user message answered from the index: (messages with a grounded last turn, sources, notes
        on passages trimmed to fit the context)."""
        if self.index is None:
            raise APIError(400, "this server has no RAG index: start it with --rag_index=DIR", param='rag')
        question = messages[-1]['content']
        (hits,) = self.index.search([question], 4)
        passages = [(self.index.chunks[i], s) for i, s in hits]
        budget = self.block - min(self.max_tokens(body), self.block // 2) - 16  # 16: the chat format's markers
        text, notes = rag.build_prompt(question, passages, self.tok, budget)
        sources = [{'n': k, 'source': c['source'], 'start': c['start'], 'end': c['end'], 'score': s,
                    'text': c['text'][:500]} for k, (c, s) in enumerate(passages, 1)]
        return messages[:-1] + [{'role': 'user', 'content': text}], sources, notes


def chat_messages(body):
    msgs = body.get('messages')
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise APIError(400, f"'messages' must be a non-empty list of up to {MAX_MESSAGES} {{role, content}}",
                       param='messages')
    for m in msgs:
        if not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant') or \
                not isinstance(m.get('content'), str):
            raise APIError(400, "each message needs a role (system, user or assistant) and a content string",
                           param='messages')
    size = sum(len(m['content']) for m in msgs)
    if size > MAX_PROMPT_CHARS:
        raise APIError(400, f"the messages hold {size} characters, over the {MAX_PROMPT_CHARS} taken: send less "
                            f"(the model sees only its context's worth of the end anyway)", param='messages')
    return msgs


# ----------------------------------------------------------------------------------------------------------
# HTTP: strict framing, this host only, and JSON errors for everything

HOST = re.compile(r'(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::([0-9]{1,5}))?', re.IGNORECASE)


def split_host(value):
    """(name in lower case, port or None) of a Host header or an origin's host[:port]; (None, None) if malformed."""
    m = HOST.fullmatch(value.strip())
    return (m[1].lower(), m[2] and str(int(m[2]))) if m else (None, None)


def same_origin(origin, host):
    """Whether a browser's Origin header names the host the request was sent to (so it comes from our page)."""
    scheme, sep, rest = origin.strip().lower().partition('://')
    if not sep or scheme not in ('http', 'https'):
        return False  # 'null' (a sandboxed frame, a file), or not a web origin at all
    default = '80' if scheme == 'http' else '443'
    (oname, oport), (name, port) = split_host(rest), split_host(host)
    return oname is not None and oname == name and (oport or default) == (port or default)


class Handler(BaseHTTPRequestHandler):
    app = None  # set by serve(), as is timeout (--timeout)
    protocol_version = 'HTTP/1.1'
    timeout = 30  # seconds one socket read or write may wait: a stalled client is dropped, not waited for
    PUBLIC = ('/', '/train', '/health')  # open without the API key: the pages ask for it, health tells nothing

    def log_message(self, fmt, *args):  # one short line per request, not the default's
        if os.environ.get('CHAT_UI_QUIET') != '1':
            print(f"{self.address_string()} {fmt % args}")

    # -- connections ---------------------------------------------------------------------------------------
    def setup(self):
        super().setup()
        self.unread = self.started = False

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: no one to answer, nothing worth a traceback

    def handle_one_request(self):
        self.unread = self.started = False  # a request body not read yet; a reply begun
        super().handle_one_request()

    def finish(self):
        if self.unread:
            self.linger()
        super().finish()

    def linger(self):
        """Read and drop what the client still sends (a refused body), for a second at most, before closing:
        closing a socket with unread bytes resets the connection, and the client could lose our answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline, left = time.monotonic() + 1, 16 << 20
            while time.monotonic() < deadline and left > 0 and (chunk := self.connection.recv(1 << 16)):
                left -= len(chunk)
        except OSError:
            pass

    def client_gone(self):
        """Whether the client closed its end: its socket reads as end-of-file. MSG_PEEK leaves any bytes it
        sent ahead (a next request) where they are."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    # -- replies -------------------------------------------------------------------------------------------
    def send(self, status, body, ctype='application/json', headers=None):
        data = body if isinstance(body, bytes) else (json.dumps(body) if ctype == 'application/json' else body).encode()
        if self.unread:
            self.close_connection = True  # the body's bytes were not read: they must not pass for the next request
        self.started = True
        self.send_response(status)
        self.send_header('Content-Type', ctype + ('; charset=utf-8' if 'json' in ctype or 'html' in ctype else ''))
        self.send_header('Content-Length', str(len(data)))
        self.send_header('X-Content-Type-Options', 'nosniff')
        if ctype == 'text/html':
            self.send_header('X-Frame-Options', 'DENY')  # no other site may frame the pages (clickjacking)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status == 429:
            self.send_header('Retry-After', '1')
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def error(self, e):
        self.send(e.status, e.json(), headers=e.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, headers too long or too many, an unknown
        method) in the API's JSON shape; the connection then closes, as what follows cannot be trusted."""
        if not str(self.request_version).startswith('HTTP/1.'):
            self.request_version = 'HTTP/1.0'  # else the reply would have no status line (HTTP/0.9)
        self.close_connection = self.unread = True  # the rest of what it sent is unread: linger() drains it
        self.log_error("code %d, message %s", code, message)
        if code == 501:
            text = f"method {shown(self.command)} is not supported: use GET or POST"
        else:
            text = f"{shown(message or self.responses.get(code, ('bad request',))[0], 200)}: " \
                   f"send a well-formed HTTP/1.1 request"
        self.error(APIError(code, text))

    # -- requests ------------------------------------------------------------------------------------------
    def check_host(self):
        """Refuse requests not meant for this server. A web page elsewhere can make a browser send requests here
        (cross-site: its Origin differs) or point a name of its own at 127.0.0.1 (DNS rebinding: the Host is that
        name), and the browser would let that page read the replies."""
        hosts = self.headers.get_all('Host') or []
        if len(hosts) > 1:
            raise APIError(400, "send one Host header, not several")
        host = hosts[0] if hosts else ''
        if not self.app.any_host and split_host(host)[0] not in self.app.hosts:
            raise APIError(403, f"Host {shown(host)} is not served here: use http://127.0.0.1:"
                                f"{self.server.server_port}/ or start the server with --host=<that name>",
                           'permission_error')
        origin = self.headers.get('Origin')
        if origin is not None and not same_origin(origin, host):
            raise APIError(403, f"requests from pages at {shown(origin)} are refused: use this server's own page, "
                                f"or call the API from outside a browser", 'permission_error')

    def authorised(self):
        key = self.app.cfg.api_key
        if not key:
            return True
        scheme, _, token = self.headers.get('Authorization', '').strip().partition(' ')
        # compare_digest: the time taken must not tell how much of a guess was right
        return scheme.lower() == 'bearer' and hmac.compare_digest(token.strip().encode('utf-8', 'surrogateescape'),
                                                                  key.encode('utf-8', 'surrogateescape'))

    def body(self):
        """The request's JSON object. Only a Content-Length body is read (http.server cannot decode a chunked
        one, whose bytes would pass for the next request), of at most --max_body bytes, within --timeout s."""
        if 'Transfer-Encoding' in self.headers:
            raise APIError(411, "chunked request bodies are not supported: send the body with a Content-Length")
        lengths = self.headers.get_all('Content-Length') or []
        if not lengths:
            raise APIError(411, "a POST needs a Content-Length header giving the body's size in bytes")
        if len(lengths) > 1 or not re.fullmatch(r'[0-9]{1,15}', lengths[0].strip()):
            raise APIError(400, f"Content-Length must be one whole number of bytes, got {shown(', '.join(lengths))}")
        size, limit = int(lengths[0]), self.app.cfg.max_body
        if size > limit:
            raise APIError(413, f"request body of {size} bytes is over the {limit}-byte limit: send less, or start "
                                f"the server with a larger --max_body")
        ctype = self.headers.get('Content-Type', '')
        if ctype.split(';')[0].strip().lower() != 'application/json':  # a page may send text/plain cross-site
            raise APIError(415, f"Content-Type must be application/json, not {shown(ctype)}: send the body as JSON")
        body = parse_json(self.read_body(size))
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get('model')
        if model not in (None, '', self.app.name):
            raise APIError(404, f"model '{shown(model)}' does not exist; this server has '{self.app.name}'",
                           'not_found_error', 'model')
        return body

    def read_body(self, size):
        """size bytes of body, within --timeout seconds in all: a client that trickles them is dropped too."""
        deadline, parts, left = time.monotonic() + self.timeout, [], size
        while left:
            if time.monotonic() > deadline:
                raise APIError(408, f"the request body took over {self.timeout:g} s to arrive: send it at once")
            chunk = self.rfile.read1(min(left, 1 << 16))
            if not chunk:
                raise ClientGone
            parts.append(chunk)
            left -= len(chunk)
        self.unread = False
        return b''.join(parts)

    def route(self, method):
        path = self.path.split('?')[0]
        # a body not read (any but a POST's, or one refused unread) closes the connection after the reply
        self.unread = method == 'POST' or 'Transfer-Encoding' in self.headers or \
            self.headers.get('Content-Length', '0').strip() != '0'
        try:
            if self.request_version == 'HTTP/0.9':
                return self.send_error(400, "HTTP/0.9 is not supported")
            self.check_host()
            if path not in self.PUBLIC and not self.authorised():
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               'authentication_error')
            allowed = [m for m, p in ROUTES if p == path]
            if not allowed:
                raise APIError(404, f"no {method} {shown(path)} here: see /v1/models, /v1/completions, "
                                    f"/v1/chat/completions, /health", 'not_found_error')
            if method not in allowed:
                raise APIError(405, f"{method} is not allowed on {path}: use {' or '.join(allowed)}",
                               headers={'Allow': ', '.join(allowed)})
            ROUTES[(method, path)](self)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away or stalled: no one to answer
        except Exception as e:  # noqa: BLE001 - answer in the API's shape rather than drop the connection
            if self.started:  # a stream has begun: it cannot turn into an error reply now
                self.close_connection = True
                print(f"chat_ui: {method} {shown(path)} failed mid-reply: {type(e).__name__}: {e}", file=sys.stderr)
            else:
                self.error(api_error(e))

    def do_GET(self):
        self.route('GET')

    def do_POST(self):
        self.route('POST')

    def other(self):  # the methods a client may try: a JSON 405 (OPTIONS too: no CORS preflight is granted)
        self.route(self.command)
    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = other

    # -- streaming -----------------------------------------------------------------------------------------
    def sse_start(self):
        self.started = True
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')
        self.end_headers()
        self.close_connection = True

    def sse(self, obj):
        self.wfile.write(b'data: ' + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b'\n\n')
        self.wfile.flush()


def api_error(e):
    """Any exception as the APIError to answer with."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):  # e.g. a question that cannot fit the context
        return APIError(400, str(e))
    traceback.print_exception(e)  # a bug of ours, not the client's: the log shows where
    return APIError(500, f"internal error: {type(e).__name__}: {shown(str(e), 200)}", 'server_error')


# ----------------------------------------------------------------------------------------------------------
# the endpoints

def generate(h, body, prompt, chat, extra=None):
    """Run one completion request (chat or not), streaming or not. Every field is checked before the job is
    queued; the job is cancelled when the reply ends, however it ends."""
    app = h.app
    stream, include_usage = stream_settings(body)
    stop = app.stops(body, app.style.stop if chat else [])
    job, cut, prompt_tokens = app.job(body, prompt)
    app.engine.submit(job)
    rid = ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex[:24]
    base = {'id': rid, 'object': 'chat.completion.chunk' if chat else 'text_completion', 'created': int(time.time()),
            'model': app.name}
    # without a stream nothing is written while we wait, so the socket is watched to see the client leave
    alive = (lambda: True) if stream else (lambda: not h.client_gone())
    rows = [job.rows(app.tok, stop, r, alive) for r in range(job.n)]

    def usage():
        done = sum(state['tokens'] for _, state in rows)
        u = {'prompt_tokens': prompt_tokens - cut, 'completion_tokens': done, 'total_tokens': prompt_tokens - cut + done}
        return {**u, 'prompt_tokens_truncated': cut} if cut else u

    try:
        if stream:
            streamed(h, job, rows, base, chat, extra, usage if include_usage else None)
        else:
            texts = [''.join(pieces) for pieces, _ in rows]
            choices = [({'index': i, 'message': {'role': 'assistant', 'content': t}} if chat else
                        {'index': i, 'text': t, 'logprobs': None}) | {'finish_reason': rows[i][1]['reason']}
                       for i, t in enumerate(texts)]
            h.send(200, {**base, 'object': 'chat.completion' if chat else 'text_completion', 'choices': choices,
                         'usage': usage(), **(extra or {})})
    finally:
        job.cancelled.set()


def streamed(h, job, rows, base, chat, extra, usage):
    """The rows as server-sent events; rows of n > 1 are read by threads of their own so that their chunks
    interleave as they come. An error after the stream began is its last event."""
    merged = queue.Queue()

    def reader(i):
        try:
            for piece in rows[i][0]:
                merged.put((i, piece))
            merged.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the stream, which reports it
            merged.put((i, e))
    for i in range(job.n):
        threading.Thread(target=reader, args=(i,), daemon=True).start()
    h.sse_start()
    try:
        if chat:
            for i in range(job.n):
                h.sse({**base, 'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                                            'finish_reason': None}], **(extra or {})})
        open_rows = job.n
        while open_rows:
            try:
                i, piece = merged.get(timeout=POLL)
            except queue.Empty:
                if h.client_gone():  # it left while its job waited in the queue, or between tokens
                    return
                continue
            if isinstance(piece, Exception):
                h.sse(api_error(piece).json())
                return
            if piece is None:
                open_rows -= 1
                end = {'index': i, 'finish_reason': rows[i][1]['reason']}
                h.sse({**base, 'choices': [end | ({'delta': {}} if chat else {'text': ''})]})
            elif piece:
                h.sse({**base, 'choices': [{'index': i, 'finish_reason': None} |
                                           ({'delta': {'content': piece}} if chat else {'text': piece})]})
        if usage:
            h.sse({**base, 'choices': [], 'usage': usage()})
        h.sse(b'[DONE]')
    except (ConnectionError, TimeoutError):
        pass  # the client went away (closed the page, pressed stop): its rows end at the next token


def completions(h):
    body = h.body()
    prompt = body.get('prompt')
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param='prompt')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise APIError(400, f"'prompt' holds {len(prompt)} characters, over the {MAX_PROMPT_CHARS} taken: send less "
                            f"(the model sees only its context's worth of the end anyway)", param='prompt')
    generate(h, body, prompt, chat=False)


def chat_completions(h):
    body = h.body()
    messages, extra = chat_messages(body), None
    use_rag = body.get('rag')
    if use_rag is not None and not isinstance(use_rag, bool):
        raise APIError(400, "'rag' must be true or false", param='rag')
    if use_rag:
        messages, sources, notes = h.app.rag_prompt(messages, body)
        extra = {'sources': sources, 'rag_notes': notes}
    generate(h, body, messages, chat=True, extra=extra)


def models(h):
    app = h.app
    h.send(200, {'object': 'list', 'data': [{'id': app.name, 'object': 'model', 'created': app.created,
                                             'owned_by': 'nanollm', 'parameters': app.params,
                                             'context_length': app.block, 'quantize': app.cfg.quantize or None,
                                             'rag': app.index is not None}]})


def health(h):
    e = h.app.engine
    h.send(200, {'status': 'ok', 'model': h.app.name, 'waiting': len(e.pending), 'decoding_rows': e.running,
                 'tokens_decoded': e.tokens, 'widest_batch': e.widest})


def metrics(h):
    path = os.path.join(h.app.cfg.metrics_dir or h.app.cfg.init_from, 'metrics.jsonl')
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written right now
    card = os.path.join(os.path.dirname(path), 'eval_report.md')  # eval.py --report=<run>/eval_report.md
    report = ''
    if os.path.isfile(card):
        with open(card, encoding='utf-8', errors='replace') as f:
            report = f.read(1 << 16)  # a report card is a few KB; never send a huge file
    h.send(200, {'path': path, 'exists': os.path.isfile(path), 'records': records, 'report': report})


def page(name):
    return lambda h: h.send(200, h.app.pages[name], 'text/html')


ROUTES = {('GET', '/'): page('chat'), ('GET', '/train'): page('train'), ('GET', '/health'): health,
          ('GET', '/v1/models'): models, ('GET', '/api/metrics'): metrics,
          ('POST', '/v1/completions'): completions, ('POST', '/v1/chat/completions'): chat_completions}


# ----------------------------------------------------------------------------------------------------------
# the pages: HTML files next to this one, each self-contained (its CSS and JS inline, nothing from a CDN)

PAGES = {'chat': 'chat_ui.html', 'train': 'chat_ui_train.html'}


def load_pages():
    """Each page's bytes, read once at start-up: a page missing stops the server before the model loads."""
    pages = {}
    for name, file in PAGES.items():
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
        try:
            with open(path, encoding='utf-8') as f:
                pages[name] = f.read().encode()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the {name} page {path} ({getattr(e, 'strerror', None) or e}): "
                            f"restore it from the repository") from None
    return pages


# ----------------------------------------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog that holds a burst of clients (its default of 5 resets the
    rest), and a cap on open connections, as each holds a thread: over it, a client gets a 503 and is closed."""
    request_queue_size = 256
    daemon_threads = True
    max_connections = 256

    def __init__(self, *args):
        super().__init__(*args)
        self.connections, self.lock = 0, threading.Lock()

    def process_request(self, request, client_address):
        with self.lock:
            full = self.connections >= self.max_connections
            self.connections += not full
        if full:
            return self.refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread could start: this connection is not open after all
            with self.lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections -= 1

    def refuse(self, request):
        e = APIError(503, f"the server has {self.max_connections} connections open: retry shortly", 'server_error')
        data = json.dumps(e.json()).encode()
        try:
            request.settimeout(0.5)
            request.sendall(b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n'
                            b'Connection: close\r\nContent-Length: %d\r\n\r\n%s' % (len(data), data))
        except OSError:
            pass
        self.shutdown_request(request)


class Server6(Server):
    address_family = socket.AF_INET6


def serve(cfg, ready=None):
    """Load the model and serve until interrupted or server.stop(): HTTP in background threads, decoding in the
    calling thread. ready(server) is called once it listens (tests use it)."""
    app = App(cfg)
    handler = type('BoundHandler', (Handler,), {'app': app, 'timeout': cfg.timeout})
    try:
        server = (Server6 if ':' in cfg.host else Server)((cfg.host, cfg.port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): pick another --port") from None
    server.max_connections = cfg.max_connections
    server.stop = app.engine.close
    threading.Thread(target=server.serve_forever, daemon=True, name='http').start()
    print(f"serving {app.name} ({app.params / 1e6:.1f}M parameters) on http://{cfg.host}:{server.server_port} "
          f"(API at /v1, training curves at /train)")
    if ready:
        ready(server)
    try:
        app.engine.loop()
    except KeyboardInterrupt:
        pass
    finally:
        app.engine.close()
        server.shutdown()
        server.server_close()
    return server


def main(argv):
    cfg = parse_config(ServeConfig, argv)
    if cfg.quantize not in ('', 'int8', 'int4', 'nf4', 'dynamic'):
        raise UserError(f"quantize must be int8, int4, nf4 or dynamic, not '{cfg.quantize}'")
    if not (cfg.max_batch >= 1 and cfg.max_queue >= 1 and cfg.max_tokens >= 1 and cfg.max_connections >= 1):
        raise UserError("max_batch, max_queue, max_tokens and max_connections must be >= 1")
    if not (cfg.timeout > 0 and cfg.max_body >= 1):
        raise UserError("timeout must be > 0 seconds and max_body >= 1 byte")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"port must be in 0..65535 (0: any free port), not {cfg.port}")
    serve(cfg)


if __name__ == '__main__':
    run_cli(main)

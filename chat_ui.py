"""
A chat page, a training-curves page and an OpenAI-compatible API, served by Python's standard library.

    python chat_ui.py --init_from=out-shakespeare-char                 # then open http://127.0.0.1:8000
    python chat_ui.py --init_from=gpt2 --quantize=int8 --rag_index=rag-index --port=8080 --api_key=secret

API: GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (stream, max_tokens,
temperature, top_p, top_k, stop, seed, n, usage), errors in OpenAI's JSON shape. Pages: / (chat) and /train
(plots out_dir/metrics.jsonl while a run goes on).

One thread owns the model. Requests wait in a bounded queue (full: 429). Requests with the same sampling
settings are decoded together as one batch of rows. A client that disconnects, or presses stop on the page,
has its rows dropped at the next token, and when no row is left the batch stops.
"""
import collections
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import quantize
import rag
from model import num_params
from sample import chat_prompt, chat_style, load_model, pack_linears, stream_text
from train import UserError, parse_config, resolve_device, resolve_dtype, run_cli


@dataclass
class ServeConfig:
    init_from: str = 'out'          # train.py out_dir | gpt2 .. gpt2-xl | hf:org/name | Hugging Face folder
    host: str = '127.0.0.1'
    port: int = 8000
    device: str = 'cpu'
    dtype: str = 'float32'          # on CPU fp32 with packed weights decodes fastest (bench.py decode)
    quantize: str = ''              # int8 | int4 | nf4 | dynamic: quantize the weights at start (quantize.py)
    rag_index: str = ''             # a rag.py index: the page's RAG toggle, and "rag": true in requests
    metrics_dir: str = ''           # the run whose metrics.jsonl /train plots; '' = init_from
    api_key: str = ''               # if set, /v1/* needs "Authorization: Bearer <api_key>"
    model_name: str = ''            # the id /v1/models reports; '' = init_from's last path part
    max_batch: int = 8              # rows decoded together
    max_queue: int = 16             # requests waiting; more get 429
    max_body: int = 1 << 20         # request bytes; more get 413
    max_tokens: int = 256           # for requests that do not say
    seed: int = 1337


class APIError(Exception):
    def __init__(self, status, message, kind='invalid_request_error', param=None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


# ----------------------------------------------------------------------------------------------------------
# the engine: one thread decodes batches of waiting requests

class Job:
    """One request: its prompt ids, n rows, and per row a queue of new token ids ending with ('end', reason)."""

    def __init__(self, prompt, n, max_tokens, options):
        self.prompt, self.n, self.max_tokens, self.options = prompt, n, max_tokens, options
        self.out = [queue.Queue() for _ in range(n)]
        self.closed = [False] * n        # a row the reader no longer wants (stop string seen)
        self.cancelled = threading.Event()  # the client went away

    def rows(self, tok, stop, r):
        """(text pieces of row r, state): state['tokens'] counts the tokens read and state['reason'] says why
        the row ended ('length', 'stop'); pieces stop before any stop string and the end-of-text token."""
        state = {'tokens': 0, 'reason': None}

        def steps():
            while True:
                item = self.out[r].get()
                if isinstance(item, tuple):
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
                        q.put(('end', f'error: {e}'))

    @torch.no_grad()
    def decode(self, batch):
        owners = [(job, r) for job in batch for r in range(job.n) if not job.cancelled.is_set()]
        if not owners:
            return
        opts = batch[0].options
        steps = self.model.generate_stream([job.prompt for job, _ in owners], max(j.max_tokens for j in batch),
                                           temperature=opts['temperature'], top_k=opts['top_k'],
                                           top_p=opts['top_p'], eos_id=self.tok.eos_id, seed=opts['seed'])
        count, live = [0] * len(owners), [True] * len(owners)
        self.running, self.widest = len(owners), max(self.widest, len(owners))

        def end(i, reason):
            job, r = owners[i]
            job.out[r].put(('end', reason))
            live[i] = False

        try:
            for step in steps:
                for i, t in enumerate(step):
                    if not live[i]:
                        continue
                    job, r = owners[i]
                    if job.cancelled.is_set() or job.closed[r]:
                        end(i, 'cancelled')
                    elif t is None:
                        end(i, 'stop')
                    else:
                        job.out[r].put(t)
                        count[i] += 1
                        self.tokens += 1
                        if count[i] >= job.max_tokens:
                            end(i, 'length')
                if not any(live):
                    break  # leaving the generator stops the decoding
        finally:
            steps.close()  # now, in this thread: the generator's cleanup drops the model's KV caches
            for i in range(len(owners)):
                if live[i]:
                    end(i, 'stop')
            self.running = 0


# ----------------------------------------------------------------------------------------------------------
# requests

def number(body, key, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) or not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}], got {v!r}",
                       param=key)
    return kind(v)


class App:
    """The model, tokenizer, engine and settings the request handlers share."""

    def __init__(self, cfg):
        self.cfg = cfg
        device = resolve_device(cfg.device)
        model, tok = load_model(cfg.init_from, device, resolve_dtype(cfg.dtype, device))
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
        self.model, self.tok, self.style = model, rag.tolerant(tok), chat_style(tok)
        self.name = cfg.model_name or os.path.basename(os.path.normpath(cfg.init_from))
        self.block = model.config.block_size
        self.index = None
        if cfg.rag_index:
            self.index = rag.Index.load(cfg.rag_index)
        self.engine = Engine(model, tok, cfg.max_batch, cfg.max_queue)
        self.created = int(time.time())

    def options(self, body):
        seed = body.get('seed')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"'seed' must be an integer, got {seed!r}", param='seed')
        top_k = number(body, 'top_k', 0, 0, 10 ** 6, int)
        return dict(temperature=number(body, 'temperature', 1.0, 0, 2), top_p=number(body, 'top_p', 1.0, 0, 1) or 1.0,
                    top_k=top_k or None, seed=seed)

    def stops(self, body, default=()):
        stop = body.get('stop')
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param='stop')
        return stop + [s for s in default if s not in stop]

    def job(self, body, prompt_text):
        """A Job for prompt_text as body asks, and the tokens cut from the prompt's left to fit the context."""
        max_tokens = number(body, 'max_tokens', min(self.cfg.max_tokens, self.block // 2), 1, self.block - 1, int)
        n = number(body, 'n', 1, 1, self.cfg.max_batch, int)
        ids = self.tok.encode(prompt_text)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param='prompt')
        room = self.block - min(max_tokens, self.block // 2)  # keep room to answer in the context
        cut = max(0, len(ids) - room)
        return Job(ids[cut:], n, max_tokens, self.options(body)), cut, len(ids)

    def rag_prompt(self, messages, body):
        """The last user message answered from the index: (messages with a grounded last turn, sources, notes
        on passages trimmed to fit the context)."""
        if self.index is None:
            raise APIError(400, "this server has no RAG index: start it with --rag_index=DIR", param='rag')
        question = messages[-1]['content']
        (hits,) = self.index.search([question], 4)
        passages = [(self.index.chunks[i], s) for i, s in hits]
        max_tokens = number(body, 'max_tokens', min(self.cfg.max_tokens, self.block // 2), 1, self.block - 1, int)
        budget = self.block - min(max_tokens, self.block // 2) - 16  # 16: the chat format's markers
        text, notes = rag.build_prompt(question, passages, self.tok, budget)
        sources = [{'n': k, 'source': c['source'], 'start': c['start'], 'end': c['end'], 'score': s,
                    'text': c['text'][:500]} for k, (c, s) in enumerate(passages, 1)]
        return messages[:-1] + [{'role': 'user', 'content': text}], sources, notes


def chat_messages(body):
    msgs = body.get('messages')
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param='messages')
    for m in msgs:
        if not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant') or \
                not isinstance(m.get('content'), str):
            raise APIError(400, "each message needs a role (system, user or assistant) and a content string",
                           param='messages')
    return msgs


class Handler(BaseHTTPRequestHandler):
    app = None  # set by serve()
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):  # one short line per request, not the default's
        if os.environ.get('CHAT_UI_QUIET') != '1':
            print(f"{self.address_string()} {fmt % args}")

    # -- plumbing ------------------------------------------------------------------------------------------
    def send(self, status, body, ctype='application/json'):
        data = body if isinstance(body, bytes) else (json.dumps(body) if ctype == 'application/json' else body).encode()
        self.send_response(status)
        self.send_header('Content-Type', ctype + ('; charset=utf-8' if 'json' in ctype or 'html' in ctype else ''))
        self.send_header('Content-Length', str(len(data)))
        if status == 429:
            self.send_header('Retry-After', '1')
        self.end_headers()
        self.wfile.write(data)

    def error(self, e):
        self.send(e.status, {'error': {'message': str(e), 'type': e.kind, 'param': e.param, 'code': e.status}})

    def body(self):
        size = int(self.headers.get('Content-Length') or 0)
        if size > self.app.cfg.max_body:
            self.close_connection = True
            left = size if size <= 64 << 20 else 0  # read what was sent, so the client gets the answer, not a reset
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            raise APIError(413, f"request body of {size} bytes is over the {self.app.cfg.max_body}-byte limit")
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw or b'null')
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get('model')
        if model not in (None, '', self.app.name):
            raise APIError(404, f"model '{model}' does not exist; this server has '{self.app.name}'", 'not_found_error',
                           'model')
        return body

    def authorised(self):
        key = self.app.cfg.api_key
        return not key or self.headers.get('Authorization', '') == f'Bearer {key}'

    def route(self, method):
        path = self.path.split('?')[0]
        try:
            if path.startswith('/v1/') and not self.authorised():
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               'authentication_error')
            handler = ROUTES.get((method, path))
            if handler is None:
                raise APIError(404, f"no {method} {path} here: see /v1/models, /v1/completions, "
                                    f"/v1/chat/completions, /health", 'not_found_error')
            handler(self)
        except APIError as e:
            self.error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except UserError as e:  # e.g. a question that cannot fit the context
            self.error(APIError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - answer in the API's shape rather than drop the connection
            self.error(APIError(500, f"internal error: {type(e).__name__}: {e}", 'server_error'))

    def do_GET(self):
        self.route('GET')

    def do_POST(self):
        self.route('POST')

    # -- streaming -----------------------------------------------------------------------------------------
    def sse_start(self):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')
        self.end_headers()
        self.close_connection = True

    def sse(self, obj):
        self.wfile.write(b'data: ' + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b'\n\n')
        self.wfile.flush()


# ----------------------------------------------------------------------------------------------------------
# the endpoints

def generate(h, body, prompt, chat, extra=None):
    """Run one completion request (chat or not), streaming or not."""
    app = h.app
    job, cut, prompt_tokens = app.job(body, prompt)
    stream = body.get('stream', False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param='stream')
    default_stop = app.style.stop if chat else []
    stop = app.stops(body, default_stop)
    app.engine.submit(job)
    rid = ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex[:24]
    base = {'id': rid, 'object': 'chat.completion.chunk' if chat else 'text_completion', 'created': int(time.time()),
            'model': app.name}
    rows = [job.rows(app.tok, stop, r) for r in range(job.n)]

    def usage():
        done = sum(state['tokens'] for _, state in rows)
        u = {'prompt_tokens': prompt_tokens - cut, 'completion_tokens': done, 'total_tokens': prompt_tokens - cut + done}
        return {**u, 'prompt_tokens_truncated': cut} if cut else u

    if not stream:
        try:
            texts = [''.join(pieces) for pieces, _ in rows]
        finally:
            job.cancelled.set()
        choices = [({'index': i, 'message': {'role': 'assistant', 'content': t}} if chat else
                    {'index': i, 'text': t, 'logprobs': None}) | {'finish_reason': rows[i][1]['reason']}
                   for i, t in enumerate(texts)]
        h.send(200, {**base, 'object': 'chat.completion' if chat else 'text_completion', 'choices': choices,
                     'usage': usage(), **(extra or {})})
        return
    # rows of n > 1 are read by threads of their own so that their chunks interleave as they come
    merged = queue.Queue()

    def reader(i):
        for piece in rows[i][0]:
            merged.put((i, piece))
        merged.put((i, None))
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
            i, piece = merged.get()
            if piece is None:
                open_rows -= 1
                end = {'index': i, 'finish_reason': rows[i][1]['reason']}
                h.sse({**base, 'choices': [end | ({'delta': {}} if chat else {'text': ''})]})
            elif piece:
                h.sse({**base, 'choices': [{'index': i, 'finish_reason': None} |
                                           ({'delta': {'content': piece}} if chat else {'text': piece})]})
        if (body.get('stream_options') or {}).get('include_usage'):
            h.sse({**base, 'choices': [], 'usage': usage()})
        h.sse(b'[DONE]')
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away (closed the page, pressed stop): its rows end at the next token
    finally:
        job.cancelled.set()


def completions(h):
    body = h.body()
    prompt = body.get('prompt')
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param='prompt')
    generate(h, body, prompt, chat=False)


def chat_completions(h):
    body = h.body()
    messages, extra = chat_messages(body), None
    if body.get('rag'):
        messages, sources, notes = h.app.rag_prompt(messages, body)
        extra = {'sources': sources, 'rag_notes': notes}
    generate(h, body, chat_prompt(messages, h.app.style), chat=True, extra=extra)


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
    h.send(200, {'path': path, 'exists': os.path.isfile(path), 'records': records})


def page(name):
    return lambda h: h.send(200, PAGES[name], 'text/html')


ROUTES = {('GET', '/'): page('chat'), ('GET', '/train'): page('train'), ('GET', '/health'): health,
          ('GET', '/v1/models'): models, ('GET', '/api/metrics'): metrics,
          ('POST', '/v1/completions'): completions, ('POST', '/v1/chat/completions'): chat_completions}


# ----------------------------------------------------------------------------------------------------------
# the pages: inline HTML, CSS and JS, nothing fetched from elsewhere

STYLE = """
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,sans-serif;background:#f6f7f9;color:#1c1e21}
header{display:flex;gap:12px;align-items:center;padding:8px 14px;background:#20232a;color:#fff;flex-wrap:wrap}
header a{color:#9cf}#info{font-size:13px;opacity:.8}main{max-width:900px;margin:0 auto;padding:10px}
"""

CHAT_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,
initial-scale=1"><title>chat</title><style>""" + STYLE + """
#log{display:flex;flex-direction:column;gap:10px;min-height:50vh;margin-bottom:10px}
.msg{padding:9px 12px;border-radius:10px;white-space:pre-wrap;word-wrap:break-word;max-width:100%}
.user{background:#dbeafe;align-self:flex-end;cursor:pointer}.assistant{background:#fff;border:1px solid #ddd}
pre{background:#272822;color:#f8f8f2;padding:8px;border-radius:6px;overflow-x:auto;white-space:pre}
code{font-family:ui-monospace,monospace;font-size:13px}.src{font-size:12px;color:#555;border-left:3px solid #9cf;
padding-left:6px;margin-top:6px}textarea{width:100%;font:inherit;padding:8px;border-radius:8px;border:1px solid #bbb}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:center;margin:6px 0}button{padding:7px 14px;border-radius:8px;
border:1px solid #888;background:#fff;cursor:pointer}button.primary{background:#2563eb;color:#fff;border-color:#2563eb}
button:disabled{opacity:.45}label{font-size:13px}input[type=number]{width:70px}details{margin:6px 0}
@media (max-width:600px){body{font-size:14px}.row button{flex:1}}
</style></head><body><header><b>nanollm chat</b><span id="info">loading...</span><a href="/train">training</a>
</header><main><details><summary>settings</summary><textarea id="system" rows="2" placeholder="system prompt">
</textarea><div class="row"><label>temperature <input id="temperature" type="number" step="0.1" min="0" max="2"
value="0.8"></label><label>top-k <input id="top_k" type="number" min="0" value="0"></label><label>top-p <input
id="top_p" type="number" step="0.05" min="0" max="1" value="1"></label><label>max tokens <input id="max_tokens"
type="number" min="1" value="200"></label><label id="raglabel" hidden><input id="rag" type="checkbox"> answer from
documents (RAG)</label></div></details><div id="log"></div><textarea id="input" rows="3" placeholder="Type a
message. Enter sends, Shift+Enter is a new line. Click one of your messages to edit it."></textarea><div class="row">
<button id="send" class="primary">Send</button><button id="stop" disabled>Stop</button><button id="regen">
Regenerate</button><button id="clear">Clear</button></div></main><script>
const $=id=>document.getElementById(id);let history=[],controller=null,key=localStorage.getItem('apikey')||'';
function esc(s){return s.replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]))}
function render(t){const parts=t.split('```');return parts.map((p,i)=>i%2?'<pre><code>'+esc(p.replace(/^[\\w+-]*\\n/,
''))+'</code></pre>':esc(p).replace(/`([^`\\n]+)`/g,'<code>$1</code>').replace(/\\*\\*([^*\\n]+)\\*\\*/g,'<b>$1</b>')).join('')}
function draw(){const log=$('log');log.innerHTML='';history.forEach((m,i)=>{const d=document.createElement('div');
d.className='msg '+m.role;d.innerHTML=render(m.content);if(m.sources)d.innerHTML+=m.sources.map(s=>'<div class="src">['
+s.n+'] '+esc(s.source)+': '+esc(s.text.slice(0,200))+'...</div>').join('');if(m.role=='user')d.onclick=()=>edit(i);
log.appendChild(d)});window.scrollTo(0,document.body.scrollHeight)}
function edit(i){if(controller)return;$('input').value=history[i].content;history=history.slice(0,i);draw();
$('input').focus()}
function busy(b){$('send').disabled=b;$('regen').disabled=b;$('stop').disabled=!b}
async function ask(){const msgs=[];const sys=$('system').value.trim();if(sys)msgs.push({role:'system',content:sys});
history.forEach(m=>msgs.push({role:m.role,content:m.content}));const reply={role:'assistant',content:''};
history.push(reply);draw();const body={messages:msgs,stream:true,temperature:+$('temperature').value,
top_p:+$('top_p').value,top_k:+$('top_k').value,max_tokens:+$('max_tokens').value,rag:$('rag').checked};
controller=new AbortController();busy(true);try{let r=await fetch('/v1/chat/completions',{method:'POST',headers:{
'Content-Type':'application/json',...(key?{Authorization:'Bearer '+key}:{})},body:JSON.stringify(body),
signal:controller.signal});if(r.status==401){key=prompt('API key')||'';localStorage.setItem('apikey',key);
history.pop();controller=null;busy(false);return ask()}if(!r.ok){const e=await r.json();reply.content=
'[error] '+e.error.message;draw();return}const reader=r.body.getReader(),dec=new TextDecoder();let buf='';
const last=$('log').lastChild;while(true){const {value,done}=await reader.read();if(done)break;
buf+=dec.decode(value,{stream:true});let k;while((k=buf.indexOf('\\n\\n'))>=0){const line=buf.slice(0,k);
buf=buf.slice(k+2);if(!line.startsWith('data: '))continue;const data=line.slice(6);if(data=='[DONE]')continue;
const c=JSON.parse(data);if(c.sources)reply.sources=c.sources;const d=c.choices[0];if(d&&d.delta&&d.delta.content)
{reply.content+=d.delta.content;last.innerHTML=render(reply.content)}}}}catch(e){if(e.name!='AbortError')
reply.content+='\\n[error] '+e}finally{controller=null;busy(false);draw()}}
function send(){const t=$('input').value.trim();if(!t||controller)return;history.push({role:'user',content:t});
$('input').value='';ask()}
$('send').onclick=send;$('stop').onclick=()=>controller&&controller.abort();
$('regen').onclick=()=>{if(controller)return;while(history.length&&history[history.length-1].role=='assistant')
history.pop();if(history.length)ask()};$('clear').onclick=()=>{if(controller)controller.abort();history=[];draw()};
$('input').addEventListener('keydown',e=>{if(e.key=='Enter'&&!e.shiftKey){e.preventDefault();send()}});
fetch('/v1/models',{headers:key?{Authorization:'Bearer '+key}:{}}).then(r=>r.json()).then(j=>{const m=j.data[0];
$('info').textContent=m.id+' - '+(m.parameters/1e6).toFixed(1)+'M parameters, context '+m.context_length+
(m.quantize?', '+m.quantize:'');$('raglabel').hidden=!m.rag}).catch(()=>{$('info').textContent='(model info needs'+
' the API key)'});
</script></body></html>"""

TRAIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,
initial-scale=1"><title>training</title><style>""" + STYLE + """
.chart{background:#fff;border:1px solid #ddd;border-radius:8px;margin:10px 0;padding:6px}svg{width:100%;height:220px}
.legend{font-size:13px}</style></head><body><header><b>training curves</b><span id="info"></span><a href="/">chat</a>
</header><main><div id="charts"></div></main><script>
const charts=[['loss',[['loss','train loss','#2563eb'],['val_loss','val loss','#dc2626']]],['learning rate',
[['lr','lr','#16a34a']]],['tokens/s',[['tokens_per_sec','tokens/s','#9333ea']]]];
function chart(title,series,recs){const W=800,H=200,P=40;const pts=series.map(([k])=>recs.filter(r=>r[k]!=null)
.map(r=>[r.iter,r[k]]));const all=pts.flat();if(!all.length)return'';const xs=all.map(p=>p[0]),ys=all.map(p=>p[1]);
const x0=Math.min(...xs),x1=Math.max(...xs)||1,y0=Math.min(...ys),y1=Math.max(...ys);const sx=x=>P+(x-x0)/((x1-x0)||1)
*(W-P-10),sy=y=>H-20-(y-y0)/((y1-y0)||1)*(H-30);let s='<div class="chart"><div class="legend"><b>'+title+'</b> '+
series.map(([k,n,c])=>'<span style="color:'+c+'">&#9632; '+n+'</span>').join(' ')+'</div><svg viewBox="0 0 '+W+' '+H+
'"><text x="2" y="14" font-size="11">'+y1.toPrecision(3)+'</text><text x="2" y="'+(H-20)+'" font-size="11">'+
y0.toPrecision(3)+'</text><text x="'+P+'" y="'+(H-4)+'" font-size="11">iter '+x0+'</text><text x="'+(W-70)+'" y="'+
(H-4)+'" font-size="11">iter '+x1+'</text>';series.forEach(([k,n,c],i)=>{if(pts[i].length)s+='<polyline fill="none" '+
'stroke="'+c+'" stroke-width="2" points="'+pts[i].map(p=>sx(p[0]).toFixed(1)+','+sy(p[1]).toFixed(1)).join(' ')+
'"/>'});return s+'</svg></div>'}
async function refresh(){try{const j=await (await fetch('/api/metrics')).json();$=id=>document.getElementById(id);
document.getElementById('info').textContent=j.exists?j.path+': '+j.records.length+' records':'no '+j.path+' yet';
document.getElementById('charts').innerHTML=charts.map(([t,s])=>chart(t,s,j.records)).join('')}catch(e){}}
refresh();setInterval(refresh,2000);
</script></body></html>"""

PAGES = {'chat': CHAT_PAGE, 'train': TRAIN_PAGE}


# ----------------------------------------------------------------------------------------------------------

def serve(cfg, ready=None):
    """Load the model and serve until interrupted or server.stop(): HTTP in background threads, decoding in the
    calling thread. ready(server) is called once it listens (tests use it)."""
    app = App(cfg)
    handler = type('BoundHandler', (Handler,), {'app': app})
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): pick another --port") from None
    server.daemon_threads = True
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
    if not (cfg.max_batch >= 1 and cfg.max_queue >= 1 and cfg.max_tokens >= 1):
        raise UserError("max_batch, max_queue and max_tokens must be >= 1")
    serve(cfg)


if __name__ == '__main__':
    run_cli(main)

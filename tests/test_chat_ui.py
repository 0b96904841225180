"""chat_ui.py against a server started on 127.0.0.1 with a tiny checkpoint: the OpenAI-compatible API (with
urllib and with the `openai` client), streaming, malformed requests, a client that disconnects, many streams
at once, the full queue, and the page driven in headless Chromium."""
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import chat_ui
from conftest import shared_file


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip('transformers')
    os.environ['TIKTOKEN_CACHE_DIR'] = shared_file('tiktoken_cache')
    os.environ['CHAT_UI_QUIET'] = '1'
    folder = tmp_path_factory.mktemp('gpt2')
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                                         initializer_range=0.5)).save_pretrained(folder)
    with open(folder / 'metrics.jsonl', 'w') as f:
        f.write(json.dumps({'iter': 10, 'loss': 3.5, 'lr': 1e-3, 'tokens_per_sec': 900}) + '\n')
        f.write(json.dumps({'iter': 10, 'val_loss': 3.7}) + '\n')
    return str(folder)


def start(folder, **kw):
    cfg = chat_ui.ServeConfig(init_from=folder, port=0, model_name='tiny', **kw)
    ready = threading.Event()
    box = {}
    threading.Thread(target=chat_ui.serve, args=(cfg, lambda s: (box.update(server=s), ready.set())),
                     daemon=True).start()
    assert ready.wait(60)
    server = box['server']
    server.url = f'http://127.0.0.1:{server.server_port}'
    server.app = server.RequestHandlerClass.app
    return server


@pytest.fixture(scope='module')
def server(tiny_gpt2):
    s = start(tiny_gpt2)
    yield s
    s.stop()


def call(server, path, body=None, headers=None, raw=None):
    """(status, parsed JSON) of a request; body as JSON, or raw bytes."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={'Content-Type': 'application/json',
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(server, path, body):
    """The data: payloads of a streamed response, parsed (the final [DONE] as the string)."""
    req = urllib.request.Request(server.url + path, data=json.dumps({**body, 'stream': True}).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers['Content-Type'] == 'text/event-stream'
        events = [line[6:] for line in r.read().decode().split('\n\n') if line.startswith('data: ')]
    return [e if e == '[DONE]' else json.loads(e) for e in events]


def idle(server, seconds=10):
    deadline = time.time() + seconds
    while call(server, '/health')[1]['decoding_rows'] and time.time() < deadline:
        time.sleep(0.02)


def test_health_and_models(server):
    status, h = call(server, '/health')
    assert status == 200 and h['status'] == 'ok' and h['model'] == 'tiny'
    status, m = call(server, '/v1/models')
    assert status == 200 and m['data'][0]['id'] == 'tiny' and m['data'][0]['context_length'] == 128
    assert m['data'][0]['parameters'] > 1e6


def test_completion_equals_greedy_generate(server):
    app = server.app
    prompt = 'The meaning of life is'
    status, r = call(server, '/v1/completions', {'prompt': prompt, 'max_tokens': 12, 'temperature': 0, 'n': 2})
    assert status == 200 and r['object'] == 'text_completion' and len(r['choices']) == 2
    ids = app.tok.encode(prompt)
    idle(server)  # the model is the engine's until its batch has wound up
    want = app.model.generate([ids], 12, temperature=0)[0][len(ids):]
    assert r['choices'][0]['text'] == r['choices'][1]['text'] == app.tok.decode(want)
    assert r['usage'] == {'prompt_tokens': len(ids), 'completion_tokens': 24, 'total_tokens': len(ids) + 24}
    assert r['choices'][0]['finish_reason'] == 'length'


def test_chat_stream_equals_the_whole_answer(server):
    body = {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello there'}],
            'max_tokens': 15, 'temperature': 0, 'stream_options': {'include_usage': True}}
    status, whole = call(server, '/v1/chat/completions', body)
    assert status == 200 and whole['object'] == 'chat.completion'
    events = stream(server, '/v1/chat/completions', body)
    assert events[-1] == '[DONE]' and events[0]['choices'][0]['delta']['role'] == 'assistant'
    text = ''.join(e['choices'][0]['delta'].get('content', '') for e in events[:-1] if e['choices'])
    assert text == whole['choices'][0]['message']['content']
    assert events[-2]['usage'] == whole['usage'] and events[-3]['choices'][0]['finish_reason'] is not None


def test_stop_strings_and_seed(server):
    body = {'prompt': 'one two three', 'max_tokens': 30, 'temperature': 1.0, 'seed': 7}
    a, b = call(server, '/v1/completions', body)[1], call(server, '/v1/completions', body)[1]
    assert a['choices'][0]['text'] == b['choices'][0]['text']  # the same seed, the same sample
    text = a['choices'][0]['text']
    stop = text[5:8]
    status, c = call(server, '/v1/completions', {**body, 'stop': [stop]})
    assert c['choices'][0]['text'] == text[:text.index(stop)] and c['choices'][0]['finish_reason'] == 'stop'


def test_openai_client(server):
    openai = pytest.importorskip('openai')
    client = openai.OpenAI(base_url=server.url + '/v1', api_key='anything')
    assert [m.id for m in client.models.list()] == ['tiny']
    r = client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.role == 'assistant' and r.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == r.choices[0].message.content
    c = client.completions.create(model='tiny', prompt='Once upon', max_tokens=5, temperature=0)
    assert c.choices[0].text and c.usage.prompt_tokens == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model='gpt-9', messages=[{'role': 'user', 'content': 'Hi'}])
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}], temperature=5)


@pytest.mark.parametrize('path,body,raw,status,message', [
    ('/v1/chat/completions', None, b'{not json', 400, 'not valid JSON'),
    ('/v1/chat/completions', {'messages': []}, None, 400, "'messages' must be a non-empty list"),
    ('/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'x'}]}, None, 400, 'role'),
    ('/v1/completions', {'prompt': 'x', 'temperature': 'hot'}, None, 400, "'temperature' must be a number"),
    ('/v1/completions', {'prompt': 'x', 'max_tokens': 0}, None, 400, "'max_tokens' must be an integer"),
    ('/v1/completions', {'prompt': 'x', 'n': 99}, None, 400, "'n' must be an integer"),
    ('/v1/completions', {'prompt': 'x', 'stop': 5}, None, 400, "'stop' must be"),
    ('/v1/completions', {'prompt': ''}, None, 400, "'prompt' must be a non-empty string"),
    ('/v1/completions', {'prompt': 'x', 'model': 'other'}, None, 404, "model 'other' does not exist"),
    ('/v1/embeddings', {'input': 'x'}, None, 404, 'no POST /v1/embeddings'),
    ('/v1/completions', None, b'{"prompt": "' + b'x' * (1 << 20) + b'"}', 413, 'over the'),
])
def test_malformed_requests_get_openai_errors(server, path, body, raw, status, message):
    got, r = call(server, path, body, raw=raw)
    assert got == status and message in r['error']['message'] and r['error']['type'] and 'code' in r['error']


def test_prompt_longer_than_the_context_is_cut_from_the_left(server):
    prompt = 'word ' * 300
    status, r = call(server, '/v1/completions', {'prompt': prompt, 'max_tokens': 10, 'temperature': 0})
    assert status == 200 and r['usage']['prompt_tokens_truncated'] > 0
    u = r['usage']
    assert u['prompt_tokens'] + 10 <= 128 and u['prompt_tokens'] + u['prompt_tokens_truncated'] == \
        len(server.app.tok.encode(prompt))


def slow(app, delay=0.02):
    # each decoding step takes delay seconds, so that a test can act while a request is being decoded
    fast = type(app.model).generate_stream

    def generate_stream(*a, **kw):
        for step in fast(app.model, *a, **kw):
            time.sleep(delay)
            yield step
    app.model.generate_stream = generate_stream


def test_a_client_that_disconnects_frees_its_slot(tiny_gpt2):
    s = start(tiny_gpt2)
    slow(s.app)
    try:
        before = call(s, '/health')[1]['tokens_decoded']
        body = json.dumps({'prompt': 'Tell me a story', 'max_tokens': 100, 'stream': True}).encode()
        sock = socket.create_connection(('127.0.0.1', s.server_port))
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                     b'Content-Length: ' + str(len(body)).encode() + b'\r\n\r\n' + body)
        got = b''
        while b'data: ' not in got:  # the headers, then the first chunk
            got += sock.recv(4096)
        sock.close()  # mid-stream
        deadline = time.time() + 5
        while call(s, '/health')[1]['decoding_rows'] and time.time() < deadline:
            time.sleep(0.05)
        decoded = call(s, '/health')[1]['tokens_decoded'] - before
        assert decoded < 50, f"{decoded} tokens decoded for a client that left after the first"
        status, r = call(s, '/v1/completions', {'prompt': 'Next', 'max_tokens': 5})
        assert status == 200 and r['usage']['completion_tokens'] == 5
    finally:
        s.stop()


def test_eight_concurrent_streams_complete_and_are_batched(tiny_gpt2):
    s = start(tiny_gpt2)
    slow(s.app, 0.005)
    try:
        results = [None] * 8

        def client(i):
            events = stream(s, '/v1/chat/completions', {'messages': [{'role': 'user', 'content': f'Question {i}'}],
                                                         'max_tokens': 20, 'temperature': 0.7})
            results[i] = events
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r is not None and r[-1] == '[DONE]' for r in results)
        assert call(s, '/health')[1]['widest_batch'] >= 2  # requests that waited together were decoded together
    finally:
        s.stop()


def test_full_queue_gets_429_and_api_key_401(tiny_gpt2):
    s = start(tiny_gpt2, max_queue=1, max_batch=1, api_key='sesame')
    slow(s.app, 0.02)
    auth = {'Authorization': 'Bearer sesame'}
    try:
        status, r = call(s, '/v1/completions', {'prompt': 'x', 'max_tokens': 2})
        assert status == 401 and r['error']['type'] == 'authentication_error'
        assert call(s, '/health')[0] == 200  # /health needs no key
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(call(s, '/v1/completions', {
            'prompt': 'busy', 'max_tokens': 40, 'temperature': 0.8}, headers=auth)[0])) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        assert 429 in codes and 200 in codes
    finally:
        s.stop()


def test_training_metrics_and_pages(server, tiny_gpt2):
    status, m = call(server, '/api/metrics')
    assert status == 200 and m['exists'] and [r['iter'] for r in m['records']] == [10, 10] and m['report'] == ''
    card = os.path.join(tiny_gpt2, 'eval_report.md')  # eval.py --report=<run>/eval_report.md: shown below the curves
    with open(card, 'w') as f:
        f.write('# Report card: x\n| hellaswag | 10 | acc % | 40.00 |\n<script>alert(1)</script>\n')
    try:
        assert call(server, '/api/metrics')[1]['report'].startswith('# Report card: x\n| hellaswag')
    finally:
        os.remove(card)
    for path, marker in (('/', b'id="send"'), ('/train', b'<svg')):
        with urllib.request.urlopen(server.url + path) as r:
            page = r.read()
        assert marker in page or path == '/train'
        assert b'http://' not in page and b'https://' not in page  # nothing from a CDN
        file = chat_ui.PAGES['chat' if path == '/' else 'train']
        with open(os.path.join(os.path.dirname(chat_ui.__file__), file), 'rb') as f:
            assert page == f.read()  # served byte for byte as the file holds it


def test_a_missing_page_file_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(chat_ui.PAGES, 'train', 'no_such_page.html')
    with pytest.raises(chat_ui.UserError, match=r'train page \S*no_such_page\.html') as e:
        chat_ui.load_pages()
    assert '\n' not in str(e.value)


@pytest.fixture
def browser():
    if not (os.path.exists('/usr/bin/chromium') and os.path.exists('/usr/bin/chromedriver')):
        pytest.skip('headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does)')
    webdriver = pytest.importorskip('selenium.webdriver')
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                '--disable-background-networking', '--no-first-run', '--window-size=390,844'):  # a phone's size
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=options)
    yield driver
    driver.quit()


def test_the_page_in_a_browser_streams_stops_and_plots(tiny_gpt2, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    s = start(tiny_gpt2)
    slow(s.app, 0.03)
    try:
        browser.get(s.url + '/')
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: 'parameters' in d.find_element(By.ID, 'info').text)
        browser.execute_script("document.getElementById('max_tokens').value = 120")
        browser.find_element(By.ID, 'input').send_keys('Hello model')
        browser.find_element(By.ID, 'send').click()
        reply = lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant')  # noqa: E731
        wait.until(lambda d: reply(d) and len(reply(d)[-1].text) > 3)  # text appears while it streams
        assert browser.find_element(By.ID, 'stop').is_enabled()
        browser.find_element(By.ID, 'stop').click()
        wait.until(lambda d: d.find_element(By.ID, 'send').is_enabled())
        deadline = time.time() + 5
        while call(s, '/health')[1]['decoding_rows'] and time.time() < deadline:
            time.sleep(0.05)
        assert call(s, '/health')[1]['decoding_rows'] == 0  # stop really stopped the server's decoding
        assert call(s, '/health')[1]['tokens_decoded'] < 120
        assert browser.find_elements(By.CSS_SELECTOR, '.msg.user')[0].text == 'Hello model'
        browser.get(s.url + '/train')
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'svg polyline'))
        assert '2 records' in browser.find_element(By.ID, 'info').text
    finally:
        s.stop()

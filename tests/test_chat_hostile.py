"""chat_ui.py against hostile clients: request framing (Content-Length, chunked), Host and Origin checks,
Content-Type, the API key on every route, bounds on every field, http.server's own errors as JSON, decoding
errors, clients that stall or leave, and a bounded soak of 200 concurrent requests. Raw sockets send what
well-behaved clients never would."""
import http.client
import json
import select
import socket
import struct
import threading
import time

import pytest

from test_chat_ui import call, slow, start, tiny_gpt2  # noqa: F401 - tiny_gpt2 is a fixture used here


@pytest.fixture(scope='module')
def server(tiny_gpt2):  # noqa: F811
    s = start(tiny_gpt2)
    yield s
    s.stop()


@pytest.fixture(scope='module')
def keyed(tiny_gpt2):  # noqa: F811
    s = start(tiny_gpt2, api_key='sesame')
    yield s
    s.stop()


def connect(server, timeout=10):
    return socket.create_connection(('127.0.0.1', server.server_port), timeout=timeout)


def raw(server, head, body=b'', method=None):
    """(status, headers, parsed JSON or bytes, whether the server closed the connection after) of the reply to
    raw request bytes: head is the request line and headers, one per line."""
    sock = connect(server)
    try:
        sock.sendall(head.replace('\n', '\r\n').encode('latin-1') + b'\r\n\r\n' + body)
        r = http.client.HTTPResponse(sock, method=method or head.split(' ')[0])
        r.begin()
        data = r.read()
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return r.status, r.headers, data, r.headers['Connection'] == 'close' and peer_closed(sock)
    finally:
        sock.close()


def peer_closed(sock, wait=3.0):
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b''
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def post(server, body, extra='', path='/v1/completions', ctype='application/json'):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw(server, f'POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: {ctype}\n'
                       f'Content-Length: {len(data)}{extra}', data)


def is_openai_error(r, status):
    return isinstance(r, dict) and set(r['error']) == {'message', 'type', 'param', 'code'} and \
        r['error']['code'] == status and r['error']['message']


# ----------------------------------------------------------------------------------------------------------
# framing

BODY = b'{"prompt": "Hello", "max_tokens": 2}'


@pytest.mark.parametrize('headers,body,status,message', [
    ('Content-Length: -1', BODY + b'x' * 300, 400, 'Content-Length must be'),
    ('Content-Length: abc', BODY, 400, 'Content-Length must be'),
    ('Content-Length: 1e3', BODY, 400, 'Content-Length must be'),
    (f'Content-Length: {len(BODY)}\nContent-Length: 5', BODY, 400, 'Content-Length must be'),
    ('', BODY, 411, 'needs a Content-Length'),
    ('Content-Length: 300000000', BODY, 413, 'over the'),
])
def test_content_length_is_strict(server, headers, body, status, message):
    head = 'POST /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json' + \
        (f'\n{headers}' if headers else '')
    t0 = time.time()
    got, h, r, closed = raw(server, head, body)
    assert got == status and is_openai_error(r, status) and message in r['error']['message'], r
    assert closed and h['Connection'] == 'close'  # the unread bytes are never taken for a next request
    assert time.time() - t0 < 5


def test_chunked_bodies_are_refused_and_not_parsed_as_a_next_request(server):
    smuggled = b'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'
    chunked = b'%x\r\n%s\r\n0\r\n\r\n' % (len(BODY), BODY) + smuggled
    sock = connect(server)
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                 b'Transfer-Encoding: chunked\r\n\r\n' + chunked)
    got = b''
    while chunk := sock.recv(65536):  # the server closes the connection after its one answer
        got += chunk
    sock.close()
    assert got.startswith(b'HTTP/1.1 411') and got.count(b'HTTP/1.') == 1 and b'"status": "ok"' not in got
    assert b'chunked request bodies are not supported' in got


def test_a_body_within_the_limit_keeps_the_connection_for_the_next_request(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.server_port, timeout=30)
    for _ in range(2):
        conn.request('POST', '/v1/completions', BODY, {'Content-Type': 'application/json'})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())['usage']['completion_tokens'] <= 2
    conn.close()


# ----------------------------------------------------------------------------------------------------------
# who may ask: Host, Origin, Content-Type, the API key

@pytest.mark.parametrize('host,status', [
    ('127.0.0.1', 200), ('localhost:1234', 200), ('LOCALHOST', 200), ('[::1]:80', 200),
    ('evil.example', 403), ('evil.example:8000', 403), ('127.0.0.1.evil.example', 403), ('', 403),
])
def test_host_allow_list(server, host, status):
    got, _, r, _ = raw(server, f'GET /health HTTP/1.1\nHost: {host}')
    assert got == status, r
    if status == 403:
        assert is_openai_error(r, 403) and r['error']['type'] == 'permission_error'
        assert '--host' in r['error']['message']


def test_a_request_without_host_is_refused(server):
    got, _, r, _ = raw(server, 'GET /health HTTP/1.0')
    assert got == 403 and is_openai_error(r, 403)


def test_origin_must_be_this_server(server):
    port = server.server_port
    for origin, status in ((f'http://127.0.0.1:{port}', 200), ('http://evil.example', 403), ('null', 403),
                           (f'http://localhost:{port}', 403), (f'http://127.0.0.1:{port + 1}', 403)):
        got, _, r, _ = raw(server, f'POST /v1/completions HTTP/1.1\nHost: 127.0.0.1:{port}\nOrigin: {origin}\n'
                                   f'Content-Type: application/json\nContent-Length: {len(BODY)}', BODY)
        assert got == status, (origin, r)
        if status == 403:
            assert r['error']['type'] == 'permission_error' and 'own page' in r['error']['message']


def test_any_host_when_listening_everywhere_but_still_same_origin(tiny_gpt2):  # noqa: F811
    s = start(tiny_gpt2, host='0.0.0.0')
    try:
        assert raw(s, 'GET /health HTTP/1.1\nHost: box.lan:9')[0] == 200
        assert raw(s, 'GET /health HTTP/1.1\nHost: box.lan:9\nOrigin: http://box.lan:9')[0] == 200
        got, _, r, _ = raw(s, 'GET /health HTTP/1.1\nHost: box.lan:9\nOrigin: http://evil.example')
        assert got == 403 and is_openai_error(r, 403)
    finally:
        s.stop()


@pytest.mark.parametrize('ctype,status', [('text/plain', 415), ('application/x-www-form-urlencoded', 415),
                                          ('multipart/form-data; boundary=x', 415), ('application/json', 200),
                                          ('application/json; charset=utf-8', 200), ('Application/JSON', 200)])
def test_posts_must_be_json(server, ctype, status):
    got, _, r, _ = post(server, BODY, ctype=ctype)
    assert got == status, r
    if status == 415:
        assert is_openai_error(r, 415) and 'application/json' in r['error']['message']


@pytest.mark.parametrize('method,path', [('GET', '/api/metrics'), ('GET', '/v1/models'),
                                         ('POST', '/v1/completions'), ('POST', '/v1/chat/completions'),
                                         ('GET', '/nowhere')])
def test_the_api_key_guards_every_route(keyed, method, path):
    body = {'prompt': 'x', 'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 2}
    for auth in (None, 'Bearer wrong', 'Basic sesame', 'sesame', 'Bearer'):
        headers = {'Authorization': auth} if auth else {}
        status, r = call(keyed, path, body if method == 'POST' else None, headers=headers)
        assert status == 401 and r['error']['type'] == 'authentication_error', (path, auth)
    for auth in ('Bearer sesame', 'bearer sesame', 'BEARER  sesame'):
        status, r = call(keyed, path, body if method == 'POST' else None, headers={'Authorization': auth})
        assert status == (404 if path == '/nowhere' else 200), (path, auth, r)


def test_health_and_pages_need_no_key_and_the_pages_send_it(keyed):
    assert call(keyed, '/health')[0] == 200
    for path in ('/', '/train'):
        status, headers, page, _ = raw(keyed, f'GET {path} HTTP/1.1\nHost: 127.0.0.1')
        assert status == 200 and headers['X-Frame-Options'] == 'DENY'
        assert b"Authorization: 'Bearer ' + key" in page and b"prompt('API key')" in page and b'r.status == 401' in page
    assert b"fetch('/api/metrics', {headers: key" in raw(keyed, 'GET /train HTTP/1.1\nHost: 127.0.0.1')[2]


# ----------------------------------------------------------------------------------------------------------
# bounds on every field

@pytest.mark.parametrize('body,param', [
    (b'{"prompt": "x", "seed": 18446744073709551616}', 'seed'),
    (b'{"prompt": "x", "seed": -1}', 'seed'),
    (b'{"prompt": "x", "temperature": NaN}', 'temperature'),
    (b'{"prompt": "x", "top_p": Infinity}', 'top_p'),
    (b'{"prompt": "x", "max_tokens": -Infinity}', 'max_tokens'),
    (b'{"prompt": "x", "max_tokens": 1e400}', 'max_tokens'),
    (b'{"prompt": "x", "max_tokens": 1000000}', 'max_tokens'),
    (b'{"prompt": "x", "n": 0}', 'n'),
    (b'{"prompt": "x", "user": [1, {"deep": NaN}]}', 'user[1].deep'),
    (b'{"prompt": "x", "stream": true, "stream_options": "yes"}', 'stream_options'),
    (b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "yes"}}', 'stream_options.include_usage'),
    (b'{"prompt": "x", "stream": "yes"}', 'stream'),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 'stop'),
    (b'{"prompt": "x", "stop": "' + b'y' * 900_000 + b'"}', 'stop'),
    (b'{"prompt": "' + b'x' * 200_001 + b'"}', 'prompt'),
])
def test_fields_are_bounded(server, body, param):
    before = call(server, '/health')[1]['tokens_decoded']
    t0 = time.time()
    status, headers, r, _ = post(server, body)
    assert status == 400 and is_openai_error(r, 400) and r['error']['param'] == param, r
    assert headers['Content-Type'].startswith('application/json')  # not a stream that began first
    assert time.time() - t0 < 5 and call(server, '/health')[1]['tokens_decoded'] == before  # nothing decoded


@pytest.mark.parametrize('messages', [
    [{'role': 'user', 'content': 'x'}] * 257,
    [{'role': 'user', 'content': 'x' * 100_001}, {'role': 'user', 'content': 'x' * 100_000}],
])
def test_chat_messages_are_bounded(server, messages):
    status, _, r, _ = post(server, {'messages': messages}, path='/v1/chat/completions')
    assert status == 400 and r['error']['param'] == 'messages'
    status, _, r, _ = post(server, {'messages': messages[:1], 'rag': 'yes'}, path='/v1/chat/completions')
    assert status == 400 and r['error']['param'] in ('messages', 'rag')


@pytest.mark.parametrize('body', [b'{"prompt": ' + b'[' * 10_000 + b']' * 10_000 + b'}',
                                  b'[' * 100_000, b'{"prompt": "x", "seed": ' + b'9' * 5000 + b'}'])
def test_json_too_deep_or_too_big_is_a_400(server, body):
    status, _, r, _ = post(server, body)
    assert status == 400 and is_openai_error(r, 400) and ('deeply' in r['error']['message'] or
                                                          'not valid JSON' in r['error']['message'])


def test_a_tiny_temperature_is_greedy_not_empty(server):
    body = {'prompt': 'The cat', 'max_tokens': 6}
    greedy = call(server, '/v1/completions', {**body, 'temperature': 0})[1]
    status, tiny = call(server, '/v1/completions', {**body, 'temperature': 5e-324})
    assert status == 200 and tiny['usage']['completion_tokens'] == greedy['usage']['completion_tokens'] > 0
    assert tiny['choices'][0]['text'] == greedy['choices'][0]['text']


# ----------------------------------------------------------------------------------------------------------
# methods, paths and http.server's own errors: all JSON

@pytest.mark.parametrize('head,status', [
    ('OPTIONS /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nOrigin: http://evil.example\n'
     'Access-Control-Request-Method: POST', 403),
    ('OPTIONS /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1', 405),
    ('PUT /v1/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 2', 405),
    ('DELETE /v1/models HTTP/1.1\nHost: 127.0.0.1', 405),
    ('PATCH / HTTP/1.1\nHost: 127.0.0.1', 405),
    ('GET /v1/completions HTTP/1.1\nHost: 127.0.0.1', 405),
    ('BREW /pot HTTP/1.1\nHost: 127.0.0.1', 501),
    ('GET /nowhere HTTP/1.1\nHost: 127.0.0.1', 404),
    ('GARBAGE', 400),
    ('GET /health', 400),  # HTTP/0.9
    ('GET /health HTTP/2.0\nHost: 127.0.0.1', 505),
    ('GET /health HTTP/x\nHost: 127.0.0.1', 400),
    ('GET /health HTTP/1.1\nHost: 127.0.0.1\nX-Big: ' + 'a' * 70_000, 431),
    ('GET /health HTTP/1.1\nHost: 127.0.0.1\n' + '\n'.join(f'X-{i}: 1' for i in range(150)), 431),
    ('GET /' + 'a' * 70_000 + ' HTTP/1.1\nHost: 127.0.0.1', 414),
])
def test_every_error_is_openai_json(server, head, status):
    got, headers, r, _ = raw(server, head, b'{}' if 'Content-Length: 2' in head else b'')
    assert got == status and is_openai_error(r, status), r
    assert headers['Content-Type'].startswith('application/json') and 'Access-Control-Allow-Origin' not in headers
    if status == 405:
        assert headers['Allow'] in ('GET', 'POST')


def test_head_gets_a_405_without_a_body(server):
    status, headers, data, _ = raw(server, 'HEAD /health HTTP/1.1\nHost: 127.0.0.1')
    assert status == 405 and data == b'' and headers['Allow'] == 'GET'


# ----------------------------------------------------------------------------------------------------------
# decoding errors, and clients that stall or leave

def test_a_decoding_error_is_a_500_not_an_empty_200(server):
    app = server.app

    def broken_stream(*a, **kw):
        raise RuntimeError('the GPU caught fire')
        yield  # a generator, as the model's is

    def broken_call(*a, **kw):
        raise RuntimeError('no such kernel')
    try:
        for broken, words in ((broken_stream, 'caught fire'), (broken_call, 'no such kernel')):
            app.model.generate_stream = broken
            status, r = call(server, '/v1/completions', {'prompt': 'Hi', 'max_tokens': 5})
            assert status == 500 and r['error']['type'] == 'server_error' and words in r['error']['message'], r
            status, r = call(server, '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'Hi'}]})
            assert status == 500 and 'decoding failed' in r['error']['message']
        status, headers, data, _ = post(server, {'prompt': 'Hi', 'max_tokens': 5, 'stream': True})
        events = [e[6:] for e in data.decode().split('\n\n') if e.startswith('data: ')]
        assert status == 200 and headers['Content-Type'] == 'text/event-stream'
        assert json.loads(events[-1])['error']['code'] == 500 and '[DONE]' not in events
    finally:
        del app.model.generate_stream
    assert call(server, '/v1/completions', {'prompt': 'Hi', 'max_tokens': 3})[0] == 200  # the server goes on


def test_a_stalled_client_blocks_no_one_and_is_dropped(tiny_gpt2):  # noqa: F811
    s = start(tiny_gpt2, timeout=1.0)
    try:
        half_body = connect(s)
        half_body.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                          b'Content-Length: 100\r\n\r\n{"pro')
        half_head = connect(s)
        half_head.sendall(b'GET /hea')
        idle_keepalive = connect(s)
        t0 = time.time()
        for _ in range(3):
            assert call(s, '/health')[0] == 200
        assert time.time() - t0 < 3
        for sock in (half_body, half_head, idle_keepalive):
            assert peer_closed(sock, wait=5) and time.time() - t0 < 6
            sock.close()
        # one that trickles its body a byte at a time is cut off at the timeout too, with a 408
        sock = connect(s)
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                     b'Content-Length: 100\r\n\r\n')
        t0 = time.time()
        while not select.select([sock], [], [], 0.3)[0] and time.time() - t0 < 5:
            sock.sendall(b' ')
        reply = b''
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply.startswith(b'HTTP/1.1 408') and b'"code": 408' in reply
    finally:
        s.stop()


def test_connections_over_the_cap_get_a_503(server):
    held = connect(server)
    time.sleep(0.3)  # the connections of earlier tests have wound up
    cap, server.max_connections = server.max_connections, server.connections  # held is the last one allowed
    try:
        extra = connect(server)
        reply = b''
        while chunk := extra.recv(65536):
            reply += chunk
        extra.close()
        assert reply.startswith(b'HTTP/1.1 503') and b'connections open: retry shortly' in reply
    finally:
        server.max_connections = cap
        held.close()
    assert call(server, '/health')[0] == 200


def wait_rows(s, zero, seconds):
    deadline = time.time() + seconds
    while (call(s, '/health')[1]['decoding_rows'] == 0) != zero and time.time() < deadline:
        time.sleep(0.02)
    return (call(s, '/health')[1]['decoding_rows'] == 0) == zero


@pytest.mark.parametrize('stream', [False, True])
def test_a_client_that_leaves_cancels_its_decoding(tiny_gpt2, stream):  # noqa: F811
    s = start(tiny_gpt2)
    slow(s.app, 0.03)  # 120 tokens take 3.6 s if no one stops them
    try:
        before = call(s, '/health')[1]['tokens_decoded']
        sock = connect(s)
        body = json.dumps({'prompt': 'Tell me a story', 'max_tokens': 120, 'stream': stream}).encode()
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
        assert wait_rows(s, zero=False, seconds=10)
        sock.close()
        t0 = time.time()
        assert wait_rows(s, zero=True, seconds=3) and time.time() - t0 < 1.5
        decoded = call(s, '/health')[1]['tokens_decoded'] - before
        assert decoded < 80, f"{decoded} tokens decoded for a client that left"
        time.sleep(0.3)
        assert call(s, '/health')[1]['tokens_decoded'] - before == decoded  # and nothing after
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------------------------
# a bounded soak

def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def soak_client(s, i, counts, lock, barrier):
    body = {'prompt': f'Client {i} says', 'max_tokens': 4, 'temperature': 0.8}
    outcome = 'other'
    try:
        barrier.wait()
        if i % 3 == 2:  # leaves mid-way, half of them with a reset (SO_LINGER 0) rather than a close
            sock = connect(s, timeout=30)
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            data = json.dumps({**body, 'max_tokens': 60, 'stream': bool(i % 4)}).encode()
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                         b'Content-Length: %d\r\n\r\n%s' % (len(data), data))
            select.select([sock], [], [], 0.3)
            sock.close()
            outcome = 'left'
        else:
            conn = http.client.HTTPConnection('127.0.0.1', s.server_port, timeout=60)
            conn.request('POST', '/v1/completions', json.dumps({**body, 'stream': i % 3 == 1}),
                         {'Content-Type': 'application/json'})
            r = conn.getresponse()
            data = r.read()
            conn.close()
            ok = r.status == 200 and (b'[DONE]' in data if i % 3 == 1 else b'"choices"' in data)
            outcome = 'answered' if ok else '429' if r.status == 429 else f'status {r.status}'
    except (ConnectionError, http.client.RemoteDisconnected):
        outcome = 'reset'
    except Exception as e:  # noqa: BLE001 - counted, and shown below
        outcome = f'{type(e).__name__}: {e}'
    with lock:
        counts[outcome] = counts.get(outcome, 0) + 1


def test_soak_200_concurrent_requests(tiny_gpt2, capfd):  # noqa: F811
    s = start(tiny_gpt2, max_queue=64)
    try:
        assert call(s, '/v1/completions', {'prompt': 'warm up', 'max_tokens': 4})[0] == 200
        time.sleep(0.3)
        threads0, rss0 = threading.active_count(), rss_mb()
        n, counts, lock = 200, {}, threading.Lock()
        barrier = threading.Barrier(n, timeout=30)
        clients = [threading.Thread(target=soak_client, args=(s, i, counts, lock, barrier), daemon=True)
                   for i in range(n)]
        t0 = time.time()
        for t in clients:
            t.start()
        for t in clients:
            t.join(max(0.1, 90 - (time.time() - t0)))
        elapsed = time.time() - t0
        assert not any(t.is_alive() for t in clients), 'the soak ran past 90 s'
        assert call(s, '/health')[0] == 200
        deadline = time.time() + 15
        while threading.active_count() > threads0 + 2 and time.time() < deadline:
            time.sleep(0.1)
        threads, grown = threading.active_count(), rss_mb() - rss0
        err = capfd.readouterr().err
        with capfd.disabled():  # shown with pytest -s
            print(f"\nsoak: {n} sent in {elapsed:.1f} s: {counts}; threads {threads0} -> {threads}, "
                  f"RSS +{grown:.0f} MB, health {call(s, '/health')[1]}")
        assert sum(counts.values()) == n and counts.get('reset', 0) == 0
        assert set(counts) <= {'answered', '429', 'left'}, counts
        assert counts.get('answered', 0) >= 20 and counts.get('left', 0) > 0
        assert threads <= threads0 + 2, f"{threads - threads0} threads left behind"
        assert grown < 100
        assert 'Traceback' not in err and 'Error' not in err, err[-2000:]
    finally:
        s.stop()

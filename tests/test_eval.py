"""eval.py: each task's prompts and scoring checked by hand on small fixtures, the shared-context KV scoring
against a plain forward pass, lm-eval's rolling windows, GSM8K's answer extraction, CORE, the report and the
one-line errors. Parity with lm-evaluation-harness itself is in test_eval_lmeval.py."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import eval as E
import train
from conftest import shared_file
from model import ModelConfig, build_model
from weights import save_pretrained


@pytest.fixture(scope='module', autouse=True)
def offline_tiktoken():
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))


def tiny(model_type, block=64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type=model_type, n_layer=2, n_head=2, n_kv_head=1 if model_type == 'llama' else 2,
                      n_embd=32, vocab_size=50257, block_size=block, intermediate_size=64)
    return build_model(cfg).eval()


def scorer(model):
    tok = train.tiktoken_tokenizer('gpt2')
    s = E.Scorer(model, tok)
    s.style = train.chat_style(tok)
    return s


def reference(model, ctx, cont):
    """lm-eval's _loglikelihood_tokens, plainly: the whole sequence (cut from the left to block_size + 1) in one
    forward pass, the last len(cont) logits scored."""
    s = (ctx + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([s[:-1]]))[0][0].float(), -1)
    rows = logp[len(s) - 1 - len(cont):]
    return sum(rows[j, t].item() for j, t in enumerate(cont)), bool((rows.argmax(-1) == torch.tensor(cont)).all())


# ---- prompts, exactly as lm-eval writes them

def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


def test_hellaswag_both_forms(tmp_path):
    txt = write(tmp_path / 'h.txt', ['Roof shingle removal: A man is sitting on a roof. he', '3',
                                     'is using wrap to wrap a pair of skis.', 'is ripping level tiles off.',
                                     "is holding a rubik's cube.", 'starts pulling up roofing on a roof.'])
    it, = E.load_hellaswag(txt)
    assert it.contexts == ['Roof shingle removal: A man is sitting on a roof. he']
    assert it.continuations[3] == ' starts pulling up roofing on a roof.' and it.gold == 3
    assert it.chars == [len('is using wrap to wrap a pair of skis.'), 27, 26, 36]
    rec = {'activity_label': 'Making a cake', 'ctx_a': 'A woman [title] mixes flour.', 'ctx_b': 'she',
           'endings': ['pours  it [step] in.', 'b', 'c', 'd'], 'label': '0'}
    jl = write(tmp_path / 'h.jsonl', [json.dumps(rec)])
    it, = E.load_hellaswag(jl)
    assert it.contexts == ['Making a cake: A woman. mixes flour. She']  # [title] -> '. ', ctx_b capitalised
    assert it.continuations[0] == ' pours it in.' and it.gold == 0


def test_prompt_strings_of_every_task(tmp_path):
    arc = {'question': {'stem': 'Which is a gas?', 'choices': [{'text': 'rock', 'label': 'A'},
                                                               {'text': 'steam', 'label': 'B'}]}, 'answerKey': 'B'}
    it, = E.load_arc(write(tmp_path / 'arc.jsonl', [json.dumps(arc)]), 'arc_easy')
    assert (it.contexts, it.continuations, it.gold, it.chars) == (['Question: Which is a gas?\nAnswer:'],
                                                                  [' rock', ' steam'], 1, [4, 5])
    it, = E.load_arc(str(tmp_path / 'arc.jsonl'), 'openbookqa', prefix=False)
    assert it.contexts == ['Which is a gas?']  # lm-eval's openbookqa: the bare stem

    write(tmp_path / 'piqa' / 'valid.jsonl', [json.dumps({'goal': 'Open a jar', 'sol1': 'twist', 'sol2': 'bite'})])
    write(tmp_path / 'piqa' / 'valid-labels.lst', ['0'])
    it, = E.load_piqa(str(tmp_path / 'piqa' / 'valid.jsonl'))
    assert (it.contexts, it.continuations, it.gold) == (['Question: Open a jar\nAnswer:'], [' twist', ' bite'], 0)

    wg = {'sentence': 'Sarah beat Maria so _ got the prize.', 'option1': 'Sarah', 'option2': 'Maria', 'answer': '1'}
    it, = E.load_winogrande(write(tmp_path / 'dev.jsonl', [json.dumps(wg)]))
    assert it.contexts == ['Sarah beat Maria so Sarah', 'Sarah beat Maria so Maria']  # partial scoring
    assert it.continuations == [' got the prize.'] and it.gold == 0

    cq = {'answerKey': 'B', 'question': {'stem': 'Where are books?', 'choices': [
        {'label': L, 'text': t} for L, t in zip('ABCDE', ['sea', 'library', 'sky', 'oven', 'moon'])]}}
    it, = E.load_commonsenseqa(write(tmp_path / 'cq.jsonl', [json.dumps(cq)]))
    assert it.contexts == ['Question: Where are books?\nA. sea\nB. library\nC. sky\nD. oven\nE. moon\nAnswer:']
    assert it.continuations == [' A', ' B', ' C', ' D', ' E'] and it.gold == 1

    bq = {'question': 'is water wet', 'passage': 'Water is a liquid.', 'label': 'true'}
    it, = E.load_boolq(write(tmp_path / 'bq.jsonl', [json.dumps(bq)]))
    assert (it.contexts, it.continuations, it.gold) == (['Water is a liquid.\nQuestion: is water wet?\nAnswer:'],
                                                        [' no', ' yes'], 1)

    it, = E.load_lambada(write(tmp_path / 'l.jsonl', [json.dumps({'text': 'He said hello to Shane'})]))
    assert (it.contexts, it.continuations) == (['He said hello to'], [' Shane'])

    gs = [{'question': f'Q{i}?', 'answer': f'Work {i}.\n#### {i}'} for i in range(3)]
    cfg = E.EvalConfig(num_fewshot=2)
    it, = E.load_gsm8k(write(tmp_path / 'g.jsonl', map(json.dumps, gs)), cfg)
    assert it.contexts == ['Question: Q0?\nAnswer: Work 0.\n#### 0\n\nQuestion: Q1?\nAnswer: Work 1.\n#### 1\n\n'
                           'Question: Q2?\nAnswer:'] and it.answer.endswith('#### 2')


def test_mmlu_five_shot_prompt(tmp_path):
    dev = ['Q{0}?,a{0},b{0},c{0},d{0},{1}'.format(i, 'ABCDA'[i]) for i in range(5)]
    write(tmp_path / 'mmlu' / 'dev' / 'high_school_physics_dev.csv', dev)
    write(tmp_path / 'mmlu' / 'val' / 'high_school_physics_val.csv', ['"What, then?",1,2,3,4,C'])
    it, = E.load_mmlu(str(tmp_path / 'mmlu'), E.EvalConfig())
    shots = ''.join(f'Q{i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {"ABCDA"[i]}\n\n' for i in range(5))
    assert it.contexts == ['The following are multiple choice questions (with answers) about high school physics.'
                           '\n\n' + shots + 'What, then?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:']
    assert it.continuations == [' A', ' B', ' C', ' D'] and it.gold == 2 and it.group == 'high_school_physics'
    it, = E.load_mmlu(str(tmp_path / 'mmlu'), E.EvalConfig(num_fewshot=0))
    assert it.contexts[0].endswith('physics.\n\nWhat, then?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:')


# ---- scoring

def test_encode_pair_moves_trailing_spaces_and_splits_the_joint_encoding():
    s = scorer(tiny('gpt'))
    ctx, cont = s.encode_pair('The cat sat ', 'on the mat')  # the space goes to the continuation
    enc = s.tok.encode
    assert ctx == enc('The cat sat') and cont == enc('The cat sat on the mat')[len(ctx):]
    assert s.tok.decode(cont) == ' on the mat'
    assert s.encode_pair('', 'Hi') == ([50256], enc('Hi'))  # an empty context: the EOS prefix token


@pytest.mark.parametrize('path', ['shared', 'plain'])
@pytest.mark.parametrize('model_type', ['gpt', 'llama'])
def test_shared_context_scoring_equals_a_plain_forward_pass(model_type, path, monkeypatch):
    model = tiny(model_type, block=48)
    s = scorer(model)  # score picks the cheaper way per item; here each way is forced in turn
    monkeypatch.setattr(s, 'CALL_COST', -10 ** 6 if path == 'shared' else 10 ** 6)
    enc = s.tok.encode
    long_ctx = enc(' '.join(['word'] * 60))  # longer than block_size: cut from the left, as lm-eval does
    groups = [
        [s.encode_pair('Question: Which is a gas?\nAnswer:', c) for c in (' rock', ' steam', ' a hot cup of tea')],
        [s.encode_pair(c, ' got the prize.') for c in ('Sarah beat Maria so Sarah', 'Sarah beat Maria so Maria')],
        [s.encode_pair('Answer:', c) for c in (' A', ' B', ' C', ' D')],  # one token each: the prefix alone
        [(long_ctx, enc(' end')), (long_ctx, enc(' and the rest of it'))],
    ]
    for pairs in groups:
        got = s.score(pairs)
        for (ll, greedy), (ctx, cont) in zip(got, pairs):
            want = reference(model, ctx, cont)
            assert abs(ll - want[0]) < 1e-4 and greedy == want[1]


@pytest.mark.parametrize('model_type', ['gpt', 'llama'])
def test_many_items_at_once_equal_each_alone(model_type):
    model = tiny(model_type, block=96)
    s = scorer(model)
    shots = 'Examples.\n\n' + 'Q: one?\nAnswer: A\n\n' * 5
    groups = [[s.encode_pair(f'Question: {q}\nAnswer:', c) for c in (' rock', ' the hot steam', ' ice')]
              for q in ('Which is a gas?', 'What is hard?', 'Cold?')]  # shared contexts: together, left-padded
    groups += [[s.encode_pair(c, ' got the prize.') for c in ('Sarah beat Maria so Sarah', 'Sarah beat Maria so Mary')]]
    groups += [[s.encode_pair(shots + f'Q: {q}?\nAnswer:', c) for c in (' A', ' B')] for q in ('two', 'three', 'x')]
    groups += [[s.encode_pair('He said hello to', ' Shane')]]  # one choice: the plain batch
    together = s.score_many(groups)
    for pairs, got in zip(groups, together):
        for (ll, greedy), (ctx, cont) in zip(got, pairs):
            want = reference(model, ctx, cont)
            assert abs(ll - want[0]) < 1e-4 and greedy == want[1]


def test_items_batched_together_fit_the_context(monkeypatch):
    """A long shared prefix and another item's long continuations would overflow block_size when left-padded
    together (PIQA on a 256-token model did): such items run in separate batches, and score as they do alone."""
    model = tiny('llama', block=40)
    s = scorer(model)
    monkeypatch.setattr(s, 'CALL_COST', -10 ** 6)  # always the shared-prefix way
    enc = s.tok.encode
    groups = [[(enc(' '.join(['long'] * 30)), enc(c)) for c in (' a', ' b')],          # prefix 30, rest 1
              [(enc('Short:'), enc(' ' + ' '.join(['x'] * n))) for n in (20, 25)]]  # prefix 2, rest 25
    for pairs, got in zip(groups, s.score_many(groups)):
        for (ll, greedy), (ctx, cont) in zip(got, pairs):
            want = reference(model, ctx, cont)
            assert abs(ll - want[0]) < 1e-4 and greedy == want[1]


def test_a_prefix_shared_across_items_runs_once_and_changes_nothing(monkeypatch):
    model = tiny('llama', block=128)
    s = scorer(model)
    shots = 'The following are questions.\n\n' + 'Q: one?\nAnswer: A\n\n' * 4
    items = [[s.encode_pair(shots + f'Q: {q}?\nAnswer:', c) for c in (' A', ' B')] for q in ('two', 'three')]
    fresh = [scorer(model).score(p) for p in items]
    ran = []
    hidden = model.hidden
    monkeypatch.setattr(model, 'hidden', lambda x, pos=None, pad=None: ran.append(x.shape) or hidden(x, pos, pad))
    again = [s.score(p) for p in items]
    assert all(abs(a[0] - b[0]) < 1e-5 for fa, fb in zip(fresh, again) for a, b in zip(fa, fb))
    assert ran[1][1] < 10 < ran[0][1]  # the second item ran only its own few tokens


def test_acc_and_acc_norm_by_hand(monkeypatch):
    items = [E.Item(['c'], [' ab', ' abcdef'], 1, [2, 6]), E.Item(['c'], [' ab', ' abcdef'], 0, [2, 6])]
    lls = iter([[-3.0, -4.0], [-3.0, -4.0]])  # acc picks choice 0 (-3 > -4); acc_norm choice 1 (-4/6 > -3/2)
    s = scorer(tiny('gpt'))
    monkeypatch.setattr(s, 'score_many', lambda groups: [[(x, False) for x in next(lls)] for _ in groups])
    out, details, chance = E.run_choices('t', items, s)
    assert out['acc']['value'] == 0.5 and out['acc_norm']['value'] == 0.5
    assert details['lls'] == [[-3.0, -4.0]] * 2 and chance == 0.5
    assert math.isclose(out['acc']['stderr'], math.sqrt(0.5 / 2))  # sample std / sqrt(n), as lm-eval
    lls = iter([[-3.0, -4.0], [-3.0, -4.0]])
    assert set(E.run_choices('winogrande', items, s)[0]) == {'acc'}  # lm-eval reports acc alone for these


def test_rolling_windows_predict_every_token_once():
    model = tiny('gpt', block=8)
    s = scorer(model)
    ids = list(range(100, 120))  # 20 tokens: windows of 8, 8, then the last 4 with 4 more tokens of context
    seq = [50256] + ids
    # plainly: each token is predicted from the block_size tokens before it, cut at window starts
    expected = 0.0
    with torch.no_grad():
        for start, end, scored_from in ((0, 8, 0), (8, 16, 8), (12, 20, 16)):
            logp = F.log_softmax(model(torch.tensor([seq[start:end]]))[0][0], -1)
            for pos in range(start, end):
                if pos >= scored_from:
                    expected += logp[pos - start, seq[pos + 1]].item()
    total, scored = s.rolling(ids, batch_size=2)
    assert abs(total - expected) < 1e-4 and scored == 20


def test_wikitext_pages_and_detokenizer():
    text = ' \n = Lobster = \n \n The lobster @-@ like animal , big . \n \n = = Range = = \n x \n = Crab = \n y \n'
    pages = E.wikitext_pages(text)
    assert len(pages) == 2 and pages[0].startswith(' = Lobster') and ' = = Range = = ' in pages[0]
    assert E.wikitext_detokenize(' The lobster @-@ like animal , big . \n') == ' The lobster-like animal, big.\n'


def test_gsm8k_answers_as_lm_eval_extracts_them():
    assert E.extract('so 5 + 3 = 8.\n#### 8') == ('8', '8')
    assert E.extract('The answer is $1,200.') == ('[invalid]', '$1,200.')
    assert E.normalise_answer('$1,200.') == '1200' == E.normalise_answer('Work.\n#### 1,200')
    assert E.extract('no digits') == ('[invalid]', '[invalid]')


def test_core_centres_each_task_on_its_chance_level():
    results = {'hellaswag': {'metrics': {'acc_norm': {'value': 0.40}, 'acc': {'value': 0.3}}, 'chance': 0.25},
               'winogrande': {'metrics': {'acc': {'value': 0.55}}, 'chance': 0.5},
               'lambada': {'metrics': {'acc': {'value': 0.30}}, 'chance': 0.0},
               'wikitext': {'metrics': {'word_perplexity': {'value': 30.0}}, 'chance': None}}
    core, centred = E.core_score(results)
    assert centred == pytest.approx({'hellaswag': 0.2, 'winogrande': 0.1, 'lambada': 0.3})
    assert core == pytest.approx(0.2)


# ---- the command line: a report, and one line per task that cannot run

@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('gpt')
    save_pretrained(tiny('gpt', block=256), str(folder))
    return str(folder)


def eval_dir(tmp_path):
    d = tmp_path / 'evaldata'
    arc = {'question': {'stem': 'Which is a gas?', 'choices': [{'text': 'rock', 'label': 'A'},
                                                               {'text': 'steam', 'label': 'B'}]}, 'answerKey': 'B'}
    write(d / 'arc_easy' / 'ARC-Easy-Dev.jsonl', [json.dumps(arc)] * 3)
    write(d / 'piqa' / 'valid.jsonl', [json.dumps({'goal': 'g', 'sol1': 'a', 'sol2': 'b'})] * 2)  # no labels file
    write(d / 'boolq' / 'val.jsonl', ['{"question": "q", "passage": "p"'])  # broken JSON
    write(d / 'lambada' / 'lambada_test.jsonl', [json.dumps({'text': 'one two three four'})] * 2)
    write(d / 'wikitext' / 'wiki.valid.tokens', [' = A = ', ' some text , here . ', ' = B = ', ' more text '])
    return d


def test_cli_report_with_failing_tasks_alongside(hf_folder, tmp_path, capsys):
    report = tmp_path / 'new' / 'card.md'  # its folder is made
    r = E.main([f'--init_from={hf_folder}', f'--data_dir={eval_dir(tmp_path)}', f'--report={report}',
                '--tasks=arc_easy,piqa,boolq,lambada,wikitext,nonsense', '--device=cpu', '--dtype=float32'])
    assert set(r['tasks']) == {'arc_easy', 'lambada', 'wikitext'}
    assert 'valid-labels.lst' in r['errors']['piqa'] and 'not valid JSON' in r['errors']['boolq']
    assert r['errors']['nonsense'].startswith('unknown task; choose from hellaswag')
    out = capsys.readouterr().out
    assert all(line.count('\n') == 0 for line in r['errors'].values())
    assert 'error: piqa:' in out and 'CORE' in out
    saved = json.loads((tmp_path / 'new' / 'card.json').read_text())
    assert saved['tasks']['arc_easy']['n'] == 3 and len(saved['tasks']['arc_easy']['sha256']) == 64
    assert saved['settings']['tasks'].endswith('nonsense') and saved['core']['value'] is not None
    card = report.read_text()
    assert '| arc_easy | 3 | acc_norm % |' in card and '**CORE**' in card and 'piqa: not run' in card
    w = saved['tasks']['wikitext']['metrics']
    assert math.isclose(w['bits_per_byte']['value'], math.log2(w['byte_perplexity']['value']), rel_tol=1e-9)


def test_cli_errors_are_one_line(hf_folder, tmp_path):
    from configurator import UserError
    with pytest.raises(UserError, match='--data is the file of one task'):
        E.main([f'--init_from={hf_folder}', '--tasks=arc_easy,piqa', f'--data={tmp_path}'])
    with pytest.raises(UserError, match='no task ran'):
        E.main([f'--init_from={hf_folder}', '--tasks=hellaswag', f'--data={tmp_path / "missing.txt"}'])


def test_char_model_missing_a_character_is_a_task_error(char_data, tmp_path):
    out = tmp_path / 'run'
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=32',
                '--block_size=32', '--batch_size=4', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
                '--device=cpu', '--dtype=float32'])
    write(tmp_path / 'lambada.jsonl', [json.dumps({'text': 'caf\u00e9 au lait'})])  # found in --data_dir
    from configurator import UserError
    with pytest.raises(UserError, match=r'no task ran \(2 failed\)'):
        E.main([f'--init_from={out}', '--tasks=lambada,text', f'--data_dir={tmp_path}', '--device=cpu',
                f"--report={tmp_path / 'r.md'}"])
    r = json.loads((tmp_path / 'r.json').read_text())
    assert "'é' is not in this dataset's vocabulary" in r['errors']['lambada']
    assert r['errors']['text'] == 'text needs --data=FILE or --data_dir=FOLDER'
    text = E.main([f'--init_from={out}', '--tasks=text', f'--data={char_data}', '--device=cpu'])
    assert text['tasks']['text']['metrics']['token_perplexity']['value'] < 100  # a prepare.py folder's val split


def test_download_once_then_cached_and_offline_message(hf_folder, tmp_path, monkeypatch):
    import http.server
    import threading
    served = tmp_path / 'www'
    arc = {'question': {'stem': 'Which is a gas?', 'choices': [{'text': 'rock', 'label': 'A'},
                                                               {'text': 'steam', 'label': 'B'}]}, 'answerKey': 'B'}
    write(served / 'ARC-Easy-Dev.jsonl', [json.dumps(arc)] * 2)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            hits.append(self.path)
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(E.SOURCES, 'arc_easy', [f'http://127.0.0.1:{server.server_address[1]}/ARC-Easy-Dev.jsonl'])
        args = [f'--init_from={hf_folder}', '--tasks=arc_easy', f"--cache_dir={tmp_path / 'cache'}", '--device=cpu']
        assert E.main(args)['tasks']['arc_easy']['n'] == 2 and len(hits) == 1
        assert E.main(args)['tasks']['arc_easy']['n'] == 2 and len(hits) == 1  # the second time from the cache
        monkeypatch.setitem(E.SOURCES, 'arc_easy', [f'http://127.0.0.1:{server.server_address[1]}/gone.jsonl'])
        write(tmp_path / 'only' / 'lambada_test.jsonl', [json.dumps({'text': 'one two three'})])
        r = E.main(args[:1] + [f"--cache_dir={tmp_path / 'other'}", '--tasks=arc_easy,lambada',
                               f"--data_dir={tmp_path / 'only'}"])
        assert r['errors']['arc_easy'].startswith('no arc_easy data in ') and 'HTTP 404' in r['errors']['arc_easy']
    finally:
        server.shutdown()
        server.server_close()


# ---- the real model: chat mode and GSM8K's generation

@pytest.fixture(scope='module')
def smollm():
    return shared_file('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')


def test_chat_mode_asks_through_the_template_and_reads_the_letter(smollm, monkeypatch):
    prompts = []
    real = E.generate
    monkeypatch.setattr(E, 'generate', lambda p, scorer, *a, **kw: prompts.extend(  # chat prompts come as ids
        x if isinstance(x, str) else scorer.tok.decode(x) for x in p) or real(p, scorer, *a, **kw))
    r = E.main([f'--init_from={smollm}', f"--data_dir={shared_file('eval')}", '--tasks=arc_easy,gsm8k',
                '--chat=True', '--limit=4', '--max_gen_tokens=48', '--device=cpu'])
    arc = r['tasks']['arc_easy']['metrics']
    assert set(arc) == {'acc', 'unreadable'} and arc['unreadable']['value'] < 0.5  # a letter in most replies
    assert prompts[0].startswith('<|im_start|>system\n') and prompts[0].endswith('<|im_start|>assistant\n')
    assert '\nA. ' in prompts[0] and 'Answer with the letter of the correct option only.' in prompts[0]
    assert set(r['tasks']['gsm8k']['metrics']) == {'exact_match_strict', 'exact_match_flexible'}


def test_gsm8k_few_shot_generation_stops_at_the_next_question(smollm, tmp_path):
    model, tok = train.load_model(smollm)
    s = E.Scorer(model, tok)
    s.style = train.chat_style(tok)
    items = E.load_gsm8k(shared_file('eval', 'gsm8k', 'test.head100.jsonl'), E.EvalConfig(num_fewshot=2))[:2]
    cfg = E.EvalConfig(max_gen_tokens=96, batch_size=2)
    out, details, _ = E.run_gsm8k(items, s, cfg, chat=False)
    assert all('Question:' not in reply for reply in details['replies'])  # cut at lm-eval's stop string
    assert any(reply.strip() for reply in details['replies'])  # (the instruct model may end at once: <|im_end|>)
    assert 0 <= out['exact_match_flexible']['value'] <= 1


def test_limit_and_seeded_subsample():
    items = [E.Item(['c'], [' a'], 0, group=g) for g in 'xxxxyyyy']
    for it, i in zip(items, range(8)):
        it.answer = str(i)
    first = E.subsample(items, E.EvalConfig(limit=2))
    assert [it.answer for it in first] == ['0', '1', '4', '5']  # per group (MMLU's subjects)
    a = E.subsample(items, E.EvalConfig(limit=2, shuffle=True, seed=1))
    b = E.subsample(items, E.EvalConfig(limit=2, shuffle=True, seed=1))
    assert [i.answer for i in a] == [i.answer for i in b] and len(a) == 4  # the same seed, the same items
    others = [[i.answer for i in E.subsample(items, E.EvalConfig(limit=2, shuffle=True, seed=s))] for s in range(5)]
    assert any(o != [i.answer for i in a] for o in others)  # another seed, other items


def test_the_wrong_file_for_a_task_is_named(tmp_path):
    arc = write(tmp_path / 'arc.jsonl', [json.dumps({'question': {'stem': 'q', 'choices': []}, 'answerKey': 'A'})])
    with pytest.raises(E.TaskError, match=r"piqa: .*arc.jsonl:1 is not a record of piqa \(it needs \"goal\", \"sol1\", "
                                          r"\"sol2\"\): is this the right file\?"):
        E.load_piqa(arc)
    with pytest.raises(E.TaskError, match=r"answerKey 'A' is not one of the choices \[\]"):
        E.load_arc(arc, 'arc_easy')
    bad = write(tmp_path / 'h.txt', ['ctx', 'x', 'a', 'b', 'c', 'd'])
    with pytest.raises(E.TaskError, match=r'h.txt:2 should be the gold label 0-3'):
        E.load_hellaswag(bad)


def test_a_quantized_checkpoint_evaluates(hf_folder, tmp_path):
    import quantize
    out = str(tmp_path / 'int8')
    quantize.main([f'--init_from={hf_folder}', '--mode=int8', f'--out_dir={out}', '--decode_tokens=0'])
    d = eval_dir(tmp_path)
    full = E.main([f'--init_from={hf_folder}', f'--data_dir={d}', '--tasks=arc_easy,wikitext', '--device=cpu'])
    q8 = E.main([f'--init_from={out}', f'--data_dir={d}', '--tasks=arc_easy,wikitext', '--device=cpu'])
    bpb = lambda r: r['tasks']['wikitext']['metrics']['bits_per_byte']['value']  # noqa: E731
    assert not q8['errors'] and abs(bpb(q8) - bpb(full)) / bpb(full) < 0.05

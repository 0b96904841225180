"""eval.py against EleutherAI's lm-evaluation-harness itself: tiny random GPT-2 and Llama models saved as Hugging
Face folders are scored by lm-eval's stock task configs (HFLM, pointed at local copies of the first items of the
shared data in the Hugging Face datasets' layout) and by eval.py (its loaders reading the same items in their
published formats): HellaSwag, ARC-Easy, PIQA, Winogrande, MMLU, OpenBookQA, CommonsenseQA, BoolQ, LAMBADA
(lambada_openai) and WikiText. Per item and per choice the log-likelihoods agree to 1e-4, acc and acc_norm are
the same, the prompts are the same strings, and LAMBADA's and WikiText's perplexities agree to 1e-4 relative.

lm-eval is pointed at local files by a YAML of our own that includes the stock one (lm_eval/tasks/...) and
overrides dataset_path to 'json' with dataset_kwargs.data_files, loaded by a TaskManager that indexes only our
folder (include_defaults=False). The Llama's tokenizer adds a BOS token (as Llama 2's does), the GPT-2's none;
the GPT-2's block of 128 tokens makes MMLU's 5-shot prompts, most BoolQ passages and some LAMBADA texts be cut
from the left, and WikiText's pages run in many windows."""
import csv
import json
import math
import os

import pytest
import torch

# lm-eval's datasets and models would otherwise look for the Hugging Face hub; datasets reads these at import
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
lm_eval = pytest.importorskip('lm_eval')
transformers = pytest.importorskip('transformers')
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import bench  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from conftest import shared_file  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402
from weights import save_pretrained  # noqa: E402

N = 5  # items per task (per MMLU subject)
SUBJECTS = ['abstract_algebra', 'anatomy', 'global_facts']
PAGES = 3  # WikiText articles
MODELS = {  # the Llama: grouped-query attention and a block long enough for the MMLU prompts
    'gpt': dict(model_type='gpt', n_layer=2, n_head=2, n_embd=32, block_size=128),
    'llama': dict(model_type='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=1024),
}
TASKS = ['hellaswag', 'arc_easy', 'piqa', 'winogrande', 'mmlu', 'openbookqa', 'commonsenseqa', 'boolq']
LMEVAL_NAME = {'commonsenseqa': 'commonsense_qa', 'lambada': 'lambada_openai'}  # eval.py's name -> lm-eval's
ACC_ONLY = ev.ACC_ONLY  # their stock configs report acc, not acc_norm
STOCK_YAML = bench.lmeval_yaml(SUBJECTS)


@pytest.fixture(scope='module', autouse=True)
def tiktoken_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))
        yield


def gpt2_tokenizer(bos):
    """GPT-2's tokenizer as transformers writes it, from the offline tiktoken cache's encoder.json and vocab.bpe."""
    folder = shared_file('tiktoken_cache')
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'rb') as f:
            head = f.read(16)
        files['vocab' if head.startswith(b'{"!": 0') else 'merges' if head.startswith(b'#version') else name] = name
    with open(os.path.join(folder, files['vocab']), encoding='utf-8') as f:
        vocab = json.load(f)
    with open(os.path.join(folder, files['merges']), encoding='utf-8') as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line.strip()]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges, add_bos_token=bos)
    assert tok.encode('hello world') == ([50256] if bos else []) + [31373, 995]
    return tok


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """kind -> a Hugging Face folder: random weights (std 0.2, so the choices' log-likelihoods differ), GPT-2's
    tokenizer; the Llama's adds <|endoftext|> as BOS, and says so in tokenizer_config.json as Llama 2's does."""
    out = {}
    for seed, (kind, cfg) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(vocab_size=50257, **cfg))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
        folder = tmp_path_factory.mktemp(kind)
        save_pretrained(model, str(folder))
        bos = kind == 'llama'
        gpt2_tokenizer(bos).save_pretrained(str(folder))
        config = json.loads((folder / 'tokenizer_config.json').read_text())
        (folder / 'tokenizer_config.json').write_text(json.dumps({**config, 'add_bos_token': bos}))
        out[kind] = str(folder)
    return out


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return bench.lmeval_data(tmp_path_factory.mktemp('data'), N, SUBJECTS, PAGES, shared_file('.'))


@pytest.fixture(scope='module')
def hflm(folders):
    """kind -> lm-eval's HFLM of the saved folder."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = HFLM(pretrained=folders[kind], device='cpu', dtype='float32', batch_size=1,
                               max_length=MODELS[kind]['block_size'])
        return cache[kind]
    return get


@pytest.fixture(scope='module')
def lmeval(hflm, data):
    """kind -> lm-eval's simple_evaluate output (with log_samples) for all the tasks, run once per kind."""
    manager = TaskManager(include_path=data['yaml'], include_defaults=False)
    cache = {}

    def run(kind):
        if kind not in cache:
            cache[kind] = lm_eval.simple_evaluate(model=hflm(kind), tasks=list(STOCK_YAML), task_manager=manager,
                                                  log_samples=True, bootstrap_iters=0)
        return cache[kind]
    return run


@pytest.fixture(scope='module')
def ours(folders):
    """kind -> eval.py's Scorer for the saved folder, as eval.evaluate builds it."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model, tok = train.load_model(folders[kind], 'cpu', 'float32')
            scorer = ev.Scorer(model, tok)
            scorer.style = train.chat_style(tok)
            cache[kind] = scorer
        return cache[kind]
    return get


def load_items(task, pub):
    folder = os.path.join(pub, task)
    if task == 'mmlu':
        return ev.load_mmlu(folder, ev.EvalConfig())
    path = os.path.join(folder, sorted(os.listdir(folder))[0] if task != 'piqa' else 'valid.jsonl')
    return {'hellaswag': ev.load_hellaswag, 'piqa': ev.load_piqa, 'winogrande': ev.load_winogrande,
            'arc_easy': lambda p: ev.load_arc(p, 'arc_easy'),
            'openbookqa': lambda p: ev.load_arc(p, 'openbookqa', prefix=False),
            'commonsenseqa': ev.load_commonsenseqa, 'boolq': ev.load_boolq, 'lambada': ev.load_lambada}[task](path)


def samples_of(result, task):
    """lm-eval's logged samples of a task in document order (MMLU: its subjects in eval.py's order)."""
    names = [f'mmlu_{s}' for s in sorted(SUBJECTS)] if task == 'mmlu' else [LMEVAL_NAME.get(task, task)]
    return [s for name in names for s in sorted(result['samples'][name], key=lambda s: s['doc_id'])]


def prompts_of(item):
    """(context, continuation) per choice, as lm-eval's samples list them in 'arguments'."""
    if len(item.contexts) == 1:
        return [(item.contexts[0], c) for c in item.continuations]
    return [(c, item.continuations[0]) for c in item.contexts]


@pytest.mark.parametrize('kind', list(MODELS))
@pytest.mark.parametrize('task', TASKS)
def test_choices_match_lm_eval(lmeval, ours, data, kind, task):
    result = lmeval(kind)
    items = load_items(task, data['pub'])
    samples = samples_of(result, task)
    assert len(items) == len(samples) == (N * len(SUBJECTS) if task == 'mmlu' else N)
    for it, s in zip(items, samples):  # the same prompts (MMLU's 5-shot ones whole), the same right answer
        assert prompts_of(it) == [tuple(a) for a in s['arguments']]
        # the right answer (Winogrande's is the option that fills the blank: its target is the text after it;
        # CommonsenseQA's target is its letter, which lm-eval finds among the choices)
        target = s['target']
        if isinstance(target, str):
            target = [cont for _, cont in s['arguments']].index(' ' + target)
        assert it.gold == (int(s['doc']['answer']) - 1 if task == 'winogrande' else target)
    metrics, details, _ = ev.run_choices(task, items, ours(kind))
    for i, (mine, s) in enumerate(zip(details['lls'], samples)):
        theirs = [r[0] for r in s['filtered_resps']]
        assert mine == pytest.approx(theirs, abs=1e-4), f"{task} item {i}: {mine} vs lm-eval's {theirs}"
    if task == 'mmlu':  # per subject, and over all items (lm-eval's group acc, weighted by size)
        for subject in SUBJECTS:
            assert metrics['subjects'][subject]['value'] == pytest.approx(
                result['results'][f'mmlu_{subject}']['acc,none'], abs=1e-12)
        assert metrics['acc']['value'] == pytest.approx(sum(s['acc'] for s in samples) / len(samples), abs=1e-12)
        return
    theirs = result['results'][LMEVAL_NAME.get(task, task)]
    for name in ('acc',) if task in ACC_ONLY else ('acc', 'acc_norm'):
        assert metrics[name]['value'] == pytest.approx(theirs[f'{name},none'], abs=1e-12), name
        per_item = [s[name] for s in samples]  # and item by item
        assert [float(x) for x in metrics_per_item(name, details['lls'], items)] == pytest.approx(per_item), name


def metrics_per_item(name, lls, items):
    """acc (or acc_norm) of each item from eval.py's log-likelihoods, as run_choices decides them."""
    norm = (lambda ll, it: [l / max(n, 1) for l, n in zip(ll, it.chars)]) if name == 'acc_norm' else \
        (lambda ll, it: ll)
    return [ev.argmax(norm(ll, it)) == it.gold for ll, it in zip(lls, items)]


def test_mmlu_prompt_is_lm_evals_five_shot(lmeval, data):
    """The whole 5-shot prompt, spelled out: description, dev examples with their answers, the question."""
    first = samples_of(lmeval('gpt'), 'mmlu')[0]
    item = load_items('mmlu', data['pub'])[0]
    with open(os.path.join(data['pub'], 'mmlu', 'dev', 'abstract_algebra_dev.csv'), encoding='utf-8') as f:
        dev = list(csv.reader(f))
    assert len(dev) == 5
    context = first['arguments'][0][0]
    assert context.startswith('The following are multiple choice questions (with answers) about abstract algebra.'
                              '\n\n' + dev[0][0].strip() + '\nA. ' + dev[0][1] + '\nB. ')
    assert context.count('\nAnswer:') == 6 and context.endswith('\nAnswer:')
    assert f'\nAnswer: {dev[4][5].strip()}\n\n' in context
    assert item.contexts == [context] and item.continuations == [' A', ' B', ' C', ' D']


@pytest.mark.parametrize('kind', list(MODELS))
def test_wikitext_matches_lm_eval(lmeval, ours, data, kind):
    result = lmeval(kind)
    samples = sorted(result['samples']['wikitext'], key=lambda s: s['doc_id'])
    pages = data['pages']
    assert len(samples) == len(pages) == PAGES
    scorer, cfg = ours(kind), ev.EvalConfig(batch_size=4)
    texts = [(p, ev.wikitext_detokenize(p)) for p in pages]
    for (page, text), s in zip(texts, samples):
        assert s['arguments'][0][0] == text  # lm-eval's detokenizer, ours
        theirs = s['filtered_resps'][0]
        theirs = theirs[0] if isinstance(theirs, (list, tuple)) else theirs
        metrics, counts, _ = ev.run_perplexity('wikitext', [(page, text)], scorer, cfg)
        assert counts['tokens'] > scorer.block  # more than one window a page (the GPT-2's: a dozen or more)
        mine = -math.log(metrics['word_perplexity']['value']) * counts['words']  # the page's log-likelihood
        # (lm-eval rolls over tok_encode(text): with a tokenizer that adds a BOS, the Llama's, that BOS too)
        assert mine == pytest.approx(theirs, rel=1e-5), f"page {s['doc_id']}: {mine} vs lm-eval's {theirs}"
    metrics, counts, _ = ev.run_perplexity('wikitext', texts, scorer, cfg)
    for name in ('word_perplexity', 'byte_perplexity', 'bits_per_byte'):
        assert metrics[name]['value'] == pytest.approx(result['results']['wikitext'][f'{name},none'], rel=1e-4), name


def test_boolq_passages_cut_from_the_left(data):
    """The GPT-2's block of 128 tokens is shorter than most BoolQ passages: lm-eval and eval.py both keep the last
    block_size + 1 tokens of context + continuation, so those items test that cut (the Llama's 1024 hold all whole)."""
    tok = gpt2_tokenizer(False)
    items = load_items('boolq', data['pub'])
    lengths = [len(tok.encode(it.contexts[0] + it.continuations[1])) for it in items]
    assert sum(n > MODELS['gpt']['block_size'] + 1 for n in lengths) >= 2  # cut (and the others whole)
    assert max(lengths) < MODELS['llama']['block_size']


@pytest.mark.parametrize('kind', list(MODELS))
def test_lambada_matches_lm_eval(lmeval, ours, data, kind):
    """LAMBADA (lambada_openai): the last word's log-likelihood after the rest of the text, item by item; acc (the
    word is the greedy continuation) and perplexity (exp of the mean negative log-likelihood) over the items."""
    result = lmeval(kind)
    items = load_items('lambada', data['pub'])
    samples = samples_of(result, 'lambada')
    assert len(items) == len(samples) == N
    for it, s in zip(items, samples):
        assert prompts_of(it) == [tuple(a) for a in s['arguments']]
        assert it.continuations == [s['target']]
    scorer = ours(kind)
    metrics, details, _ = ev.run_lambada(items, scorer)
    greedy = [g for (_, g), in ev.scored_items('lambada', items, scorer, 16)]
    for i, (mine, hit, s) in enumerate(zip(details['lls'], greedy, samples)):
        theirs, their_hit = s['filtered_resps'][0]
        assert mine == pytest.approx(theirs, abs=1e-4), f"lambada item {i}: {mine} vs lm-eval's {theirs}"
        assert float(hit) == float(their_hit) == s['acc'], f"lambada item {i}"
    theirs = result['results']['lambada_openai']
    assert metrics['acc']['value'] == pytest.approx(theirs['acc,none'], abs=1e-12)
    assert metrics['perplexity']['value'] == pytest.approx(theirs['perplexity,none'], rel=1e-4)


@pytest.mark.parametrize('kind', list(MODELS))
def test_lambada_greedy_word_matches_lm_eval(hflm, ours, data, kind):
    """A random model never guesses LAMBADA's words (acc 0 for both): items cut from LAMBADA's texts where the
    model's greedy token is a word (' ' and letters, encoded after the context as that one token) end in that word
    and make acc 1, in lm-eval's loglikelihood too; the same contexts ending in the text's own word make acc 0."""
    from lm_eval.api.instance import Instance
    scorer = ours(kind)
    made = []
    for it in load_items('lambada', data['pub']):
        words = (it.contexts[0] + it.continuations[0]).split(' ')
        for j in range(len(words) - 1, len(words) - 40, -1):
            ctx = ' '.join(words[:j])
            with torch.no_grad():
                t = scorer.model(torch.tensor([scorer.encode(ctx)[-scorer.block:]]))[0][0, -1].argmax().item()
            w = scorer.tok.decode([t])
            if w[:1] == ' ' and w[1:].isalpha() and w[1:] != words[j] and \
                    scorer.encode(ctx + w) == scorer.encode(ctx) + [t]:
                made += [(ctx, w, True), (ctx, ' ' + words[j], False)]
                break
        if len(made) >= 6:
            break
    assert len(made) >= 4, 'too few contexts whose greedy tokens are words'
    items = [ev.Item([ctx], [w], 0) for ctx, w, _ in made]
    metrics, details, _ = ev.run_lambada(items, scorer)
    theirs = hflm(kind).loglikelihood([Instance('loglikelihood', {}, (ctx, w), 0) for ctx, w, _ in made],
                                      disable_tqdm=True)
    greedy = [g for (_, g), in ev.scored_items('lambada', items, scorer, 16)]
    assert greedy == [g for *_, g in made] == [bool(g) for _, g in theirs]
    assert details['lls'] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert metrics['acc']['value'] == pytest.approx(0.5)


def test_cli_report_matches_lm_eval(lmeval, folders, data):
    """eval.py end to end (--data_dir with the published files, its CPU weight packing on): lm-eval's numbers."""
    result = lmeval('gpt')['results']
    report = ev.main([f'--init_from={folders["gpt"]}', f'--data_dir={data["pub"]}', '--device=cpu',
                      '--dtype=float32', f'--tasks={",".join(TASKS)},lambada,wikitext'])
    assert not report['errors']
    for task in TASKS + ['lambada']:
        if task == 'mmlu':
            continue
        theirs = result[LMEVAL_NAME.get(task, task)]
        for name in ('acc',) if task in ACC_ONLY | {'lambada'} else ('acc', 'acc_norm'):
            assert report['tasks'][task]['metrics'][name]['value'] == pytest.approx(theirs[f'{name},none'])
    assert report['tasks']['lambada']['metrics']['perplexity']['value'] == pytest.approx(
        result['lambada_openai']['perplexity,none'], rel=1e-4)
    for s in SUBJECTS:
        assert report['tasks']['mmlu']['metrics']['subjects'][s]['value'] == pytest.approx(result[f'mmlu_{s}']['acc,none'])
    for name in ('word_perplexity', 'byte_perplexity', 'bits_per_byte'):
        assert report['tasks']['wikitext']['metrics'][name]['value'] == pytest.approx(
            result['wikitext'][f'{name},none'], rel=1e-4)

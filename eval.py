"""
Score a model on the standard benchmarks, the way the field scores them, and write a report card.

    python eval.py --init_from=out-shakespeare-char --tasks=text --data=data/shakespeare_char
    python eval.py --init_from=model.gguf --data_dir=../shared/data/eval --tasks=hellaswag,arc_easy,piqa,mmlu
    python eval.py --init_from=model.gguf --data_dir=../shared/data/eval --tasks=core --limit=500 --report=report.md
    python eval.py --init_from=model.gguf --data_dir=../shared/data/eval --tasks=gsm8k,mmlu --chat=True

--init_from is anything train.load_model takes: a train.py or quantize.py out_dir, a Hugging Face folder or
name, a GGUF file. Each task reads its data in the format it was published in, from --data (one task) or
from --data_dir (its usual file names, in the task's own subfolder or not), else downloads it once into
--cache_dir (resumable; offline, a one-line message says what to pass instead).

Scoring follows EleutherAI's lm-evaluation-harness (the task configs of lm_eval 0.4.13): the same prompts,
target delimiter (' '), few-shot separator ('\n\n'), the context's trailing spaces moved onto the
continuation, the continuation's tokens taken from encoding context + continuation together, and
  acc       the choice with the highest summed log-likelihood;
  acc_norm  the highest log-likelihood per character of the choice (lm-eval divides by len(str));
LAMBADA: greedy last-word accuracy and perplexity; MMLU: 5-shot from dev, scored on the answer letter,
per subject and macro/micro averaged; GSM8K: few-shot greedy generation, the answer after '####' (strict)
or the last number (flexible); WikiText and any text: lm-eval's rolling, non-overlapping windows, giving
token and word perplexity and bits per byte. The CORE line centres each task's accuracy on its chance
level b, (acc - b) / (1 - b), and averages them, as nanochat does.

Speed: the choices of an item share their context, which runs once; its KV cache is copied to one row per
choice and only the continuations run after it, in one batch.
"""
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import (DownloadError, UserError, atomic_write, cached_download, decode_file, download, jsonl_lines,
                          parse_config, run_cli, writable_file)
from model import pack_linears, setup_cache
from train import chat_style, eval_data_tokens, load_model, resolve_device, resolve_dtype


@dataclass
class EvalConfig:
    init_from: str = 'out'           # train.py out_dir | gpt2 .. | hf:org/name | Hugging Face folder | .gguf
    tasks: str = 'core'              # comma-separated task names, 'core' or 'all' (see TASKS)
    data: str = ''                   # the data file (or folder: mmlu, text) of the one task in --tasks
    data_dir: str = ''               # a folder with the tasks' files under their usual names
    cache_dir: str = 'data/.cache/eval'  # downloads go here
    limit: int = 0                   # score at most this many items per task (MMLU: per subject); 0 = all
    shuffle: bool = False            # with limit: a seeded random subsample instead of the first items
    seed: int = 1234
    num_fewshot: int = -1            # -1 = each task's usual (MMLU 5, GSM8K 5, the others 0)
    chat: bool = False               # instruct models: ask through the chat template, read the letter/number
    batch_size: int = 16             # rows per forward pass (generation, perplexity windows)
    max_gen_tokens: int = 256        # GSM8K and chat replies stop after this many tokens
    report: str = ''                 # write a markdown report card here (and the JSON beside it, .json)
    json_out: str = ''               # the JSON report's path, if not beside --report
    device: str = 'auto'
    dtype: str = 'auto'              # float32 | bfloat16 | float16 | auto
    pack: bool = True                # CPU: pre-pack weights for oneDNN (as sample.py)
    trust_checkpoint: bool = False   # load checkpoints that need pickle (it can run code): trusted files only
    timeout: float = 30.0            # seconds a download may stall


class TaskError(Exception):
    """A task that cannot run (its data is missing or malformed, or the model cannot read it): one line, and the
    other tasks still run."""


# ----------------------------------------------------------------------------------------------------------
# the tasks' data, read in their published formats

# name -> (chance level for CORE, the usual file names, where to download it)
RAW = 'https://raw.githubusercontent.com'
COT = f'{RAW}/raybears/cot-transparency/f6874394ba80a439237e4d7581dddc30d40c1830/data'
MMLU_URL = f'{RAW}/raybears/cot-transparency/bd97732d94b1e1faf99bdb1656bf7d55d8036937/data/mmlu'
SOURCES = {
    'hellaswag': [f'{RAW}/rowanz/hellaswag/master/data/hellaswag_val.jsonl'],
    'arc_easy': [f'{COT}/arc_easy/ARC-Easy-Dev.jsonl'],
    'arc_challenge': [f'{COT}/arc_challenge/ARC-Challenge-Dev.jsonl'],
    'piqa': [f'{RAW}/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/valid.jsonl',
             f'{RAW}/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/valid-labels.lst'],
    'winogrande': [f'{RAW}/zhang-edward/WinoGrande/ea61adace986f13f152757273a9b0840887efe65/data/dev.jsonl'],
    'openbookqa': [f'{COT}/openbook_qa/test.jsonl'],
    'commonsenseqa': [f'{RAW}/kojima-takeshi188/zero_shot_cot/5ef330fcdeec0cd26aee27943504f91f8ec1c33c/dataset/'
                      'CommonsenseQA/dev_rand_split.jsonl'],
    'boolq': [f'{RAW}/FormulaMonks/llm-benchmarker-suite/5d3c8009ab8f5adab4899c34dd203cbf7afcb372/data/SuperGLUE/'
              'BoolQ/val.jsonl'],
    'lambada': [f'{RAW}/cybertronai/bflm/620fff70127e0a7c741ee229ed2e33e25dd5185a/lambada_test.jsonl'],
    'gsm8k': [f'{RAW}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/'
              'test.jsonl'],
    'wikitext': [f'{RAW}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/'
                 'wikitext-2/valid.txt'],
}
FILES = {  # the usual names: glob patterns tried in data_dir/<task>/ and data_dir/
    'hellaswag': ['hellaswag*.txt', 'hellaswag*.jsonl'], 'arc_easy': ['ARC-Easy*.jsonl'],
    'arc_challenge': ['ARC-Challenge*.jsonl'], 'piqa': ['valid*.jsonl'], 'winogrande': ['dev*.jsonl'],
    'openbookqa': ['test*.jsonl', '*.jsonl'], 'commonsenseqa': ['dev*.jsonl'], 'boolq': ['val*.jsonl'],
    'lambada': ['lambada*.jsonl'], 'gsm8k': ['test*.jsonl'], 'mmlu': ['.'],
    'wikitext': ['wiki.valid.tokens', 'wiki.valid.raw', 'valid.txt', 'wiki*.txt'],
}
CORE_TASKS = ['hellaswag', 'arc_easy', 'arc_challenge', 'piqa', 'winogrande', 'openbookqa', 'commonsenseqa',
              'boolq', 'lambada']
ALL_TASKS = CORE_TASKS + ['mmlu', 'gsm8k', 'wikitext']
FEWSHOT = {'mmlu': 5, 'gsm8k': 5}


@dataclass
class Item:
    """One question. Multiple choice: contexts (one, or one per choice: Winogrande) and continuations (one per
    choice, or one shared); gold the right choice. chars: each choice's length for acc_norm."""
    contexts: list
    continuations: list
    gold: int
    chars: list = None
    group: str = ''          # MMLU's subject
    question: dict = None    # what chat mode needs: {'text', 'letters'} or {'text'} (GSM8K)
    answer: str = ''         # GSM8K's reference answer


def find_data(task, cfg):
    """The file (or folder) that holds the task's data: --data, a usual name in --data_dir, or a download."""
    if cfg.data:
        if not os.path.exists(cfg.data):
            raise TaskError(f"--data '{cfg.data}' not found")
        return cfg.data
    if cfg.data_dir and task in FILES:
        import glob
        for where in (os.path.join(cfg.data_dir, task), cfg.data_dir):
            for pattern in FILES[task]:
                if pattern == '.':
                    if os.path.isdir(os.path.join(where, 'dev')):
                        return where
                    continue
                found = sorted(glob.glob(os.path.join(glob.escape(where), pattern)))
                found = [f for f in found if os.path.isfile(f)]
                if found:
                    return found[0]
    if task == 'mmlu':
        return download_mmlu(cfg)
    if task not in SOURCES:
        raise TaskError(f"{task} needs --data=FILE or --data_dir=FOLDER")
    try:
        paths = [cached_download(u, cfg.cache_dir, (10, cfg.timeout), retries=2) for u in SOURCES[task]]
    except DownloadError as e:
        where = f" in {cfg.data_dir}" if cfg.data_dir else ''
        raise TaskError(f"no {task} data{where} and could not download it ({e}): pass --data=FILE or "
                        f"--data_dir=FOLDER (names: {', '.join(FILES[task])})") from None
    return paths[0]


MMLU_SUBJECTS = '''abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
college_chemistry college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
professional_psychology public_relations security_studies sociology us_foreign_policy virology
world_religions'''.split()


def download_mmlu(cfg):
    folder = os.path.join(cfg.cache_dir, 'mmlu')
    try:
        for split in ('dev', 'val'):
            os.makedirs(os.path.join(folder, split), exist_ok=True)
            for s in MMLU_SUBJECTS:
                download(f'{MMLU_URL}/{split}/{s}_{split}.csv', os.path.join(folder, split, f'{s}_{split}.csv'),
                         (10, cfg.timeout), retries=2)
    except DownloadError as e:
        raise TaskError(f"no mmlu data and could not download it ({e}): pass --data=FOLDER or --data_dir=FOLDER "
                        f"holding mmlu/dev/*_dev.csv and mmlu/val/ (or test/)") from None
    return folder


def read_text(path, task):
    text, why = decode_file(path)
    if text is None:
        raise TaskError(f"{task}: '{path}' {why}")
    return text


def read_jsonl(path, task, fields):
    """The records of a JSONL file, each checked to have fields (a dict of name -> type)."""
    out = []
    try:
        lines = list(jsonl_lines(read_text(path, task), path))
    except UserError as e:
        raise TaskError(f"{task}: {e}") from None
    for n, rec in lines:
        if not isinstance(rec, dict) or any(not isinstance(_get(rec, k), t) for k, t in fields.items()):
            want = ', '.join(f'"{k}"' for k in fields)
            raise TaskError(f"{task}: {path}:{n} is not a record of {task} (it needs {want}): is this the right file?")
        out.append(rec)
    if not out:
        raise TaskError(f"{task}: '{path}' holds no items")
    return out


def _get(rec, dotted):
    for k in dotted.split('.'):
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def read_labels(path, task, n, name):
    """PIQA's and Winogrande's labels, one per line in a .lst file beside the data."""
    if not os.path.isfile(path):
        raise TaskError(f"{task}: the labels file '{path}' is missing (it comes with the data as {name})")
    labels = read_text(path, task).split()
    if len(labels) < n:
        raise TaskError(f"{task}: '{path}' has {len(labels)} labels for {n} items")
    return labels[:n]


def hellaswag_clean(text):
    """lm-eval's HellaSwag preprocessing: WikiHow's [title] and [step] artefacts out, double spaces single."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub(r'\[.*?\]', '', text).replace('  ', ' ')


def mc(context, choices, gold, **kw):
    """A multiple-choice item as lm-eval builds it: context, then ' ' + choice for each choice."""
    return Item([context], [' ' + c for c in choices], gold, [len(c) for c in choices], **kw)


def letters_question(stem, choices):
    letters = 'ABCDE'[:len(choices)]
    return {'text': stem.strip() + '\n' + '\n'.join(f'{l}. {c}' for l, c in zip(letters, choices)),
            'letters': letters}


def load_hellaswag(path):
    if path.endswith('.txt'):  # llama.cpp's form: 6 lines an item (context, gold 0-3, four endings)
        lines = read_text(path, 'hellaswag').splitlines()
        if len(lines) < 6:
            raise TaskError(f"hellaswag: '{path}' is not llama.cpp's 6-lines-an-item form (context, label, 4 endings)")
        items = []
        for i in range(0, len(lines) - 5, 6):
            ctx, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
            if label not in '0123' or not label:
                raise TaskError(f"hellaswag: {path}:{i + 2} should be the gold label 0-3, not {label[:20]!r}")
            items.append(mc(hellaswag_clean(ctx), [hellaswag_clean(e) for e in endings], int(label)))
        return items
    recs = read_jsonl(path, 'hellaswag', {'ctx_a': str, 'ctx_b': str, 'activity_label': str, 'endings': list})
    items = []
    for r in recs:
        if 'label' not in r:
            raise TaskError(f"hellaswag: '{path}' has no labels (the test split is unlabelled): use the val split")
        query = hellaswag_clean(r['activity_label'] + ': ' + r['ctx_a'] + ' ' + r['ctx_b'].capitalize())
        items.append(mc(query, [hellaswag_clean(e) for e in r['endings']], int(r['label'])))
    return items


def load_arc(path, task, prefix=True):
    """ARC and OpenBookQA (AI2's jsonl: question.stem, question.choices[].text/label, answerKey)."""
    items = []
    for r in read_jsonl(path, task, {'question.stem': str, 'question.choices': list, 'answerKey': str}):
        labels = [c['label'] for c in r['question']['choices']]
        texts = [c['text'] for c in r['question']['choices']]
        if r['answerKey'].strip() not in labels:
            raise TaskError(f"{task}: '{path}': answerKey {r['answerKey']!r} is not one of the choices {labels}")
        stem = r['question']['stem']
        ctx = f'Question: {stem}\nAnswer:' if prefix else stem
        items.append(mc(ctx, texts, labels.index(r['answerKey'].strip()), question=letters_question(stem, texts)))
    return items


def load_piqa(path):
    recs = read_jsonl(path, 'piqa', {'goal': str, 'sol1': str, 'sol2': str})
    lst = re.sub(r'(valid|train|test)(\.head\d+)?\.jsonl$', r'\1-labels\2.lst', path)
    labels = [r['label'] for r in recs] if all('label' in r for r in recs) else \
        read_labels(lst, 'piqa', len(recs), 'valid-labels.lst')
    return [mc(f"Question: {r['goal']}\nAnswer:", [r['sol1'], r['sol2']], int(g),
               question=letters_question(r['goal'], [r['sol1'], r['sol2']])) for r, g in zip(recs, labels)]


def load_winogrande(path):
    """The option fills the blank: the two contexts differ and the text after the blank is what is scored."""
    recs = read_jsonl(path, 'winogrande', {'sentence': str, 'option1': str, 'option2': str})
    if not all('answer' in r for r in recs):
        lst = re.sub(r'(dev|train|test)(\.head\d+)?\.jsonl$', r'\1-labels\2.lst', path)
        for r, a in zip(recs, read_labels(lst, 'winogrande', len(recs), 'dev-labels.lst')):
            r['answer'] = a
    items = []
    for r in recs:
        if r['sentence'].count('_') < 1 or str(r['answer']) not in ('1', '2'):
            raise TaskError(f"winogrande: '{path}': a sentence without a blank or an answer not 1/2: "
                            f"{r['sentence'][:60]!r}")
        i = r['sentence'].index('_')
        rest = ' ' + r['sentence'][i + 1:].strip()
        items.append(Item([r['sentence'][:i] + o for o in (r['option1'], r['option2'])], [rest],
                          int(r['answer']) - 1, [len(rest) - 1] * 2))
    return items


def load_commonsenseqa(path):
    items = []
    for r in read_jsonl(path, 'commonsenseqa', {'question.stem': str, 'question.choices': list}):
        texts = [c['text'] for c in r['question']['choices']]
        labels = [c['label'] for c in r['question']['choices']]
        if r.get('answerKey') not in labels:
            raise TaskError(f"commonsenseqa: '{path}' has an item without a valid answerKey (the test split is "
                            f"unlabelled): use the dev split")
        q = letters_question(r['question']['stem'], texts)
        ctx = 'Question: ' + q['text'] + '\nAnswer:'
        items.append(mc(ctx, labels, labels.index(r['answerKey']), question=q))
    return items


def load_boolq(path):
    items = []
    for r in read_jsonl(path, 'boolq', {'question': str, 'passage': str}):
        label = r.get('label', r.get('answer'))
        if isinstance(label, str):
            label = {'true': True, 'false': False}.get(label.strip().lower())
        if not isinstance(label, (bool, int)):
            raise TaskError(f"boolq: '{path}' has an item without a true/false label")
        items.append(mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ['no', 'yes'], int(bool(label)),
                        question={'text': f"{r['passage']}\nQuestion: {r['question']}?", 'letters': 'AB',
                                  'choices': ['no', 'yes']}))
    return items


def load_lambada(path):
    items = []
    for r in read_jsonl(path, 'lambada', {'text': str}):
        words = r['text'].split(' ')
        items.append(Item([' '.join(words[:-1])], [' ' + words[-1]], 0))
    return items


def load_mmlu(path, cfg):
    """MMLU's csv files: a folder with dev/ (the few-shot examples) and test/ or val/ (what is scored)."""
    import csv
    dev, scored = os.path.join(path, 'dev'), None
    for split in ('test', 'val'):
        if os.path.isdir(os.path.join(path, split)):
            scored = os.path.join(path, split)
            break
    if not os.path.isdir(dev) or scored is None:
        raise TaskError(f"mmlu: '{path}' should hold dev/ and test/ (or val/) folders of SUBJECT_dev.csv files")

    def rows(f):
        with open(f, encoding='utf-8', newline='') as fh:
            out = [r for r in csv.reader(fh) if r]
        for r in out:
            if len(r) != 6 or r[5].strip() not in ('A', 'B', 'C', 'D'):
                raise TaskError(f"mmlu: '{f}' is not MMLU's csv (question, A, B, C, D, answer letter)")
        return out
    shots = FEWSHOT['mmlu'] if cfg.num_fewshot < 0 else cfg.num_fewshot
    items = []
    for f in sorted(os.listdir(scored)):
        subject = re.sub(r'_(test|val)\.csv$', '', f)
        if not f.endswith('.csv') or subject == f:
            continue
        devfile = os.path.join(dev, f'{subject}_dev.csv')
        examples = rows(devfile)[:shots] if shots else []
        if len(examples) < shots:
            raise TaskError(f"mmlu: '{devfile}' is missing or has fewer than {shots} few-shot examples")
        fmt = lambda r: r[0].strip() + ''.join(f'\n{l}. {c}' for l, c in zip('ABCD', r[1:5])) + '\nAnswer:'  # noqa
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shot_text = ''.join(fmt(r) + ' ' + r[5].strip() + '\n\n' for r in examples)
        for r in rows(os.path.join(scored, f)):
            q = letters_question(r[0], r[1:5])
            items.append(Item([head + shot_text + fmt(r)], [' A', ' B', ' C', ' D'], 'ABCD'.index(r[5].strip()),
                              [1, 1, 1, 1], group=subject, question=q))
    if not items:
        raise TaskError(f"mmlu: '{scored}' holds no SUBJECT_test.csv or SUBJECT_val.csv files")
    return items


def load_gsm8k(path, cfg):
    """Few-shot examples: the first num_fewshot items of the file (GSM8K's train split, lm-eval's source, is not
    at hand offline); they are then not scored."""
    recs = read_jsonl(path, 'gsm8k', {'question': str, 'answer': str})
    shots = FEWSHOT['gsm8k'] if cfg.num_fewshot < 0 else cfg.num_fewshot
    if len(recs) <= shots:
        raise TaskError(f"gsm8k: '{path}' has {len(recs)} items; {shots} go to the few-shot examples")
    prefix = ''.join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in recs[:shots])
    return [Item([prefix + f"Question: {r['question']}\nAnswer:"], [], 0, answer=r['answer'],
                 question={'text': r['question']}) for r in recs[shots:]]


def wikitext_pages(text):
    """WikiText's articles: each starts at a top-level heading line ' = Title = '."""
    pages, cur = [], []
    for line in text.splitlines(keepends=True):
        if re.match(r'^ = [^=].* = \n?$', line) and cur:
            pages.append(''.join(cur))
            cur = []
        cur.append(line)
    if ''.join(cur).strip():
        pages.append(''.join(cur))
    return [p for p in pages if p.strip()]


def wikitext_detokenize(s):
    """lm-eval's wikitext detokenizer (WikiText's spaced punctuation and @-@ back to plain text)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((' @-@ ', '-'), (' @,@ ', ','), (' @.@ ', '.'), (' : ', ': '), (' ; ', '; '), (' . ', '. '),
                 (' ! ', '! '), (' ? ', '? '), (' , ', ', ')):
        s = s.replace(a, b)
    s = re.sub(r'\(\s*([^\)]*?)\s*\)', r'(\1)', s)
    s = re.sub(r'\[\s*([^\]]*?)\s*\]', r'[\1]', s)
    s = re.sub(r'{\s*([^}]*?)\s*}', r'{\1}', s)
    s = re.sub(r'\"\s*([^\"]*?)\s*\"', r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (('= = = =', '===='), ('= = =', '==='), ('= =', '=='), (' \u00b0 ', '\u00b0'), (' \n', '\n'),
                 ('\n ', '\n'), (' N ', ' 1 '), (" 's", "'s")):
        s = s.replace(a, b)
    return s


def load_task(task, path, cfg):
    """The task's items from its data at path (for wikitext and text: the path itself)."""
    if task in ('wikitext', 'text'):
        return path
    if task == 'mmlu':
        if not os.path.isdir(path):
            raise TaskError(f"mmlu: '{path}' should be a folder holding dev/ and test/ (or val/)")
        return load_mmlu(path, cfg)
    if os.path.isdir(path):
        raise TaskError(f"{task}: '{path}' is a folder; give the data file")
    loaders = {'hellaswag': load_hellaswag, 'piqa': load_piqa, 'winogrande': load_winogrande,
               'commonsenseqa': load_commonsenseqa, 'boolq': load_boolq, 'lambada': load_lambada,
               'arc_easy': lambda p: load_arc(p, 'arc_easy'), 'arc_challenge': lambda p: load_arc(p, 'arc_challenge'),
               'openbookqa': lambda p: load_arc(p, 'openbookqa', prefix=False),
               'gsm8k': lambda p: load_gsm8k(p, cfg)}
    return loaders[task](path)


def subsample(items, cfg, group=lambda it: it.group):
    """The first --limit items (per group: MMLU's subjects), or with --shuffle a seeded random --limit of them."""
    if not cfg.limit:
        return items
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(group(it), []).append(i)
    keep = []
    for idx in groups.values():
        keep += sorted(random.Random(cfg.seed).sample(idx, min(cfg.limit, len(idx)))) if cfg.shuffle else \
            idx[:cfg.limit]
    return [items[i] for i in sorted(keep)]


def sha256_of(path):
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        with open(p, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# log-likelihoods, with the shared context run once

def common(a, b):
    """The length of the common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class Scorer:
    """Log-likelihoods of continuations, encoded as lm-evaluation-harness encodes them."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.block = model.config.block_size
        self.device = model.transformer.ln_f.weight.device
        # lm-eval's prefix token for an empty context: the tokenizer's BOS (even one it does not add), else its EOS
        bos = tok.bos_id if tok.bos_id is not None else getattr(tok.bpe, 'bos_token_id', None)
        eos = tok.eos_id[0] if isinstance(tok.eos_id, list) and tok.eos_id else tok.eos_id
        self.prefix = bos if bos is not None else eos
        self.vocab = model.config.vocab_size
        self.kept = None  # (tokens, [(k, v) per layer]) of the last prefix that ran
        self.style = chat_style(tok)  # chat mode's prompts

    def encode(self, text):
        ids = self.tok.encode(text)
        return ([self.tok.bos_id] if self.tok.bos_id is not None else []) + ids

    def encode_pair(self, context, continuation):
        """(context ids, continuation ids): the context's trailing spaces go to the continuation, and the
        continuation's ids are the tail of encoding both together (as lm-eval's _encode_pair)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:  # lm-eval: the prefix token (BOS, else EOS) stands for an empty context
            if self.prefix is None:
                raise TaskError("an empty context needs a BOS or EOS token, and this tokenizer has neither")
            return [self.prefix], self.tok.encode(continuation)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def matched(self, prefix):
        """How many of prefix's first tokens the last prefix's KV cache holds (0 if too few to bother). MMLU's
        five examples, or GSM8K's, are the same for every question: they run once."""
        if self.kept is None:
            return 0
        r = min(common(self.kept[0], prefix), len(prefix) - 1)  # at least one token must run, for its logits
        return r if r >= 16 else 0

    def copy_kept(self, r):
        for blk, (k, v) in zip(self.model.transformer.h, self.kept[1] if r else ()):
            blk.attn.kv_cache.k[:, :, :r], blk.attn.kv_cache.v[:, :, :r] = k[:, :, :r], v[:, :, :r]

    def prepare(self, pairs):
        """(inputs, continuation ids, wanted positions, shared prefix length) of one item's pairs, as lm-eval
        builds them: context + continuation cut from the left to block_size + 1, the last token not input."""
        seqs, conts = [], []
        for ctx, cont in pairs:
            if not cont:
                raise TaskError("a continuation encodes to no tokens")
            if max(ctx + cont) >= self.vocab:
                raise TaskError(f"the text encodes to token ids past the model's vocabulary ({self.vocab})")
            s = (ctx + cont)[-(self.block + 1):]
            seqs.append(s[:-1])
            conts.append(s[len(s) - len(cont):] if len(cont) < len(s) else s[1:])
        first = [len(s) - len(c) for s, c in zip(seqs, conts)]  # the first input position whose logits count
        p = min(common(seqs[0], s) for s in seqs)
        p = max(1, min(p, min(first) + 1))  # the prefix's last row may be scored, no later one
        return seqs, conts, [list(range(f, f + len(c))) for f, c in zip(first, conts)], p

    @torch.no_grad()
    def score(self, pairs):
        """[(sum of log-probabilities, is_greedy)] of each (context ids, continuation ids) pair of one item."""
        return self.score_many([pairs])[0]

    @torch.no_grad()
    def score_many(self, groups):
        """score() of several items (each a list of pairs) in as few passes as they allow. An item whose choices
        share a prefix runs it once and copies its KV cache to one row per choice; such items run together
        (left-padded), and so do the items whose choices share too little (one right-padded batch). A prefix shared
        with the item before (MMLU's five examples) comes from the kept cache, item by item."""
        prep = [self.prepare(pairs) for pairs in groups]
        rows, together, plain = [None] * len(prep), [], []

        def flush():
            for j, r in zip(together, self.shared([prep[j] for j in together]) if together else []):
                rows[j] = r
            together.clear()
        for i, (seqs, conts, wanted, p) in enumerate(prep):
            n, T = len(seqs), max(len(s) - p for s in seqs)
            if together and together[-1] == i - 1 and common(prep[i - 1][0][0][:prep[i - 1][3]], seqs[0][:p]) >= 16:
                flush()  # this item goes on from the last one's prefix: run those now, so its cache is kept
            elif together and (max(p, max(prep[j][3] for j in together)) +
                               max(T, max(len(q) - prep[j][3] for j in together for q in prep[j][0])) > self.block):
                flush()  # left-padded to the longest prefix, plus the longest rest: it must fit in block_size
            if self.matched(seqs[0][:p]):
                rows[i] = self.shared([prep[i]])[0]
            elif n * max(map(len, seqs)) <= p + n * T + self.CALL_COST:
                plain.append(i)
            else:
                together.append(i)
        flush()
        if plain:
            got = self.plain([s for j in plain for s in prep[j][0]], [w for j in plain for w in prep[j][2]])
            k = 0
            for j in plain:
                rows[j], k = got[k:k + len(prep[j][0])], k + len(prep[j][0])
        results = []
        for (seqs, conts, _, _), item_rows in zip(prep, rows):
            out = []
            for logits, c in zip(item_rows, conts):
                logp = F.log_softmax(logits, dim=-1)
                target = torch.tensor(c, device=logp.device)
                out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
            results.append(out)
        return results

    CALL_COST = 4  # tokens' worth of compute that a separate pass costs beyond its tokens
    ROWS = 32      # choices' rows per pass after a shared prefix

    def head(self, h):
        return self.model.lm_head(self.model.transformer.ln_f(h)).float()

    def plain(self, seqs, wanted):
        """Each row's logits at its wanted positions, from right-padded batches of rows of similar length (padding
        sees only the past), the head run on the scored positions only."""
        out = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
        for c in range(0, len(order), self.ROWS):
            part = order[c:c + self.ROWS]
            L = max(len(seqs[r]) for r in part)
            h = self.model.hidden(torch.tensor([seqs[r] + [0] * (L - len(seqs[r])) for r in part], device=self.device))
            rows = torch.tensor([i for i, r in enumerate(part) for _ in wanted[r]], device=self.device)
            pos = torch.tensor([q for r in part for q in wanted[r]], device=self.device)
            for r, logits in zip(part, self.head(h[rows, pos]).split([len(wanted[r]) for r in part])):
                out[r] = logits
        return out

    def shared(self, items):
        """[each item's rows of logits at its wanted positions]: the items' prefixes run once each, together,
        left-padded to the longest (one item alone may start from the kept cache); the KV cache rows are then
        copied to one row per choice and the rest of every choice runs in one batch."""
        B, P = len(items), max(p for *_, p in items)
        T = max(len(s) - p for seqs, _, _, p in items for s in seqs)
        pads = [P - p for *_, p in items]
        reused = self.matched(items[0][0][0][:P]) if B == 1 else 0
        setup_cache(self.model, B, P + T)
        try:
            self.copy_kept(reused)
            x0 = torch.tensor([[0] * d + seqs[0][reused:p] for (seqs, _, _, p), d in zip(items, pads)],
                              device=self.device)
            pad = torch.tensor(pads, device=self.device) if any(pads) else None
            h0 = self.model.hidden(x0, pos=reused, pad=pad)[:, -1]  # (B, C): each prefix's last row
            last, d = items[-1], pads[-1]
            self.kept = (last[0][0][:last[3]], [(b.attn.kv_cache.k[B - 1:, :, d:P].clone(),
                                                 b.attn.kv_cache.v[B - 1:, :, d:P].clone())
                                                for b in self.model.transformer.h])
            if T:  # every choice's rest, in batches of rows of similar length (little padding), each row reading
                # its item's cache rows
                base = [(blk.attn.kv_cache.k, blk.attn.kv_cache.v) for blk in self.model.transformer.h]
                rows = [(b, s[p:]) for b, (seqs, _, _, p) in enumerate(items) for s in seqs]
                order = sorted((r for r in range(len(rows)) if rows[r][1]), key=lambda r: len(rows[r][1]))
                h = {}
                for c in range(0, len(order), self.ROWS):
                    part = order[c:c + self.ROWS]
                    t = max(len(rows[r][1]) for r in part)
                    idx = torch.tensor([rows[r][0] for r in part], device=self.device)
                    for blk, (k, v) in zip(self.model.transformer.h, base):
                        blk.attn.kv_cache.k, blk.attn.kv_cache.v = k[idx], v[idx]
                    x = torch.tensor([rows[r][1] + [0] * (t - len(rows[r][1])) for r in part], device=self.device)
                    out = self.model.hidden(x, pos=P, pad=None if pad is None else pad[idx])  # (rows, t, C)
                    h.update(zip(part, out))
        finally:
            setup_cache(self.model, None, 0)
        out, row = [], 0
        for b, (seqs, _, wanted, p) in enumerate(items):
            # input position q predicts token q + 1: q = p - 1 is the prefix's last row, later ones come from h
            picked = [h0[b] if q == p - 1 else h[row + i][q - p] for i, w in enumerate(wanted) for q in w]
            out.append(list(self.head(torch.stack(picked)).split([len(w) for w in wanted])))
            row += len(seqs)
        return out

    @torch.no_grad()
    def rolling(self, ids, batch_size):
        """lm-eval's loglikelihood_rolling: the text's tokens predicted in non-overlapping windows of up to
        block_size, the first token from the prefix token (BOS, else EOS; a vocabulary with neither, such as a
        character-level one, leaves the first token unscored), the last window's context filled up to
        block_size. ids: the text's tokens. Returns (sum of log-probabilities, tokens scored)."""
        seq = ([self.prefix] if self.prefix is not None else []) + list(ids)
        if len(seq) < 2:
            return 0.0, 0
        if max(seq) >= self.vocab:
            raise TaskError(f"the text encodes to token ids past the model's vocabulary ({self.vocab})")
        L, windows, done, todo = self.block, [], 0, len(seq) - 1
        while done < todo:  # a window: inputs seq[start:end] predict seq[done + 1:end + 1], end = done + n
            n = min(L, todo - done)
            windows.append((seq[max(0, done + n - L):done + n], seq[done + 1:done + n + 1]))
            done += n
        total = 0.0
        for length in sorted({len(w) for w, _ in windows}):  # equal lengths batch together
            group = [w for w in windows if len(w[0]) == length]
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                logp = F.log_softmax(self.model(torch.tensor([w for w, _ in chunk], device=self.device))[0].float(), -1)
                for row, (_, tgt) in enumerate(chunk):
                    t = torch.tensor(tgt, device=self.device)
                    total += logp[row, length - len(tgt):].gather(1, t[:, None]).sum().item()
        return total, todo


# ----------------------------------------------------------------------------------------------------------
# running the tasks

def mean_stderr(xs):
    """lm-eval's standard error of a mean: the sample standard deviation over sqrt(n)."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def metric(xs):
    return {'value': sum(xs) / len(xs), 'stderr': mean_stderr(xs)}


def progress(items, task):
    return tqdm(items, desc=task, unit='item', disable=None, dynamic_ncols=True)


def pairs_of(item, scorer):
    if len(item.contexts) == 1:
        return [scorer.encode_pair(item.contexts[0], c) for c in item.continuations]
    return [scorer.encode_pair(c, item.continuations[0]) for c in item.contexts]


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, as numpy's argmax


ACC_ONLY = {'winogrande', 'commonsenseqa', 'boolq'}


def scored_items(task, items, scorer, batch_size):
    """Each item's [(log-likelihood, is_greedy)] per choice, computed batch_size items at a time, shortest first
    within a group (MMLU's subjects stay together: their items share the five examples' prefix)."""
    pairs = [pairs_of(it, scorer) for it in items]
    order = sorted(range(len(items)), key=lambda i: (items[i].group, sum(len(c) + len(k) for c, k in pairs[i])))
    out = [None] * len(items)
    with progress(range(len(items)), task) as bar:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            for i, r in zip(chunk, scorer.score_many([pairs[i] for i in chunk])):
                out[i] = r
            bar.update(len(chunk))
    return out


def run_choices(task, items, scorer, batch_size=16):
    """acc and acc_norm of multiple-choice items (and per-item log-likelihoods, for comparisons)."""
    acc, acc_norm, lls, groups = [], [], [], {}
    for it, scored in zip(items, scored_items(task, items, scorer, batch_size)):
        ll = [l for l, _ in scored]
        lls.append(ll)
        acc.append(float(argmax(ll) == it.gold))
        acc_norm.append(float(argmax([l / max(n, 1) for l, n in zip(ll, it.chars)]) == it.gold))
        if it.group:
            groups.setdefault(it.group, []).append(acc[-1])
    out = {'acc': metric(acc), 'acc_norm': metric(acc_norm)}
    if task in ACC_ONLY:  # as lm-eval reports them: a length norm means nothing for letters or one shared ending
        del out['acc_norm']
    if groups:  # MMLU: the mean over subjects (macro) beside the mean over all items (micro, lm-eval's group acc)
        out = {'acc': metric(acc), 'acc_macro': {'value': sum(sum(g) / len(g) for g in groups.values()) / len(groups),
                                                 'stderr': None}}
        out['subjects'] = {k: {'value': sum(g) / len(g), 'n': len(g)} for k, g in sorted(groups.items())}
    chance = sum(1 / max(len(it.contexts), len(it.continuations)) for it in items) / len(items)
    return out, {'lls': lls}, chance


def run_lambada(items, scorer, batch_size=16):
    lls, hits = [], []
    for (ll, greedy), in scored_items('lambada', items, scorer, batch_size):
        lls.append(ll)
        hits.append(float(greedy))
    nll = metric([-l for l in lls])
    ppl = math.exp(nll['value'])  # lm-eval's perplexity: exp of the mean negative log-likelihood per item
    return {'acc': metric(hits), 'perplexity': {'value': ppl, 'stderr': nll['stderr'] and ppl * nll['stderr']}}, \
        {'lls': lls}, 0.0


STOP = ['Question:', '</s>', '<|im_end|>']  # lm-eval's gsm8k stops


def normalise_answer(s):
    """lm-eval's gsm8k exact_match: commas, '$', everything up to '#### ' and a final '.' removed; case ignored."""
    for pattern in (',', r'\$', r'(?s).*#### ', r'\.$'):
        s = re.sub(pattern, '', s)
    return s.strip().lower()


def extract(reply):
    """(strict, flexible) answers: the number after '####', and the last number in the reply."""
    m = re.search(r'#### (\-?[0-9\.\,]+)', reply)
    strict = m.group(1) if m else '[invalid]'
    found = re.findall(r'(-?[$0-9.,]{2,})|(-?[0-9]+)', reply)
    flexible = next((g for g in found[-1] if g), '[invalid]') if found else '[invalid]'
    return strict, flexible


def generate(prompts, scorer, cfg, stop, desc, max_new=None):
    """Greedy replies of up to max_new (default --max_gen_tokens) tokens to the prompts (texts, or token ids),
    batched by length, each cut at its first stop string."""
    model, tok = scorer.model, scorer.tok
    max_new = max_new or cfg.max_gen_tokens
    room = scorer.block - max_new
    if room < 16:
        raise TaskError(f"block_size {scorer.block} leaves no room for a prompt and {max_new} new tokens: "
                        f"lower --max_gen_tokens")
    # lm-eval cuts the context from the left too
    encoded = [(scorer.encode(p) if isinstance(p, str) else p)[-room:] for p in prompts]
    for e in encoded:
        if max(e) >= scorer.vocab:
            raise TaskError(f"the text encodes to token ids past the model's vocabulary ({scorer.vocab})")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    replies = [None] * len(prompts)
    with progress(range(len(prompts)), desc) as bar:
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            rows = model.generate([encoded[i] for i in idx], max_new, temperature=0.0, eos_id=tok.eos_id,
                                  stop=stop, decode=tok.decode)
            for i, row in zip(idx, rows):
                text = tok.decode(row[len(encoded[i]):])
                for s in stop:
                    text = text.split(s)[0]
                replies[i] = text
            bar.update(len(idx))
    return replies


def run_gsm8k(items, scorer, cfg, chat):
    if chat:
        prompts = [chat_text(scorer, it.question['text'] + '\nSolve it step by step, then give the final answer '
                             'as a number after "####".') for it in items]
        replies = generate(prompts, scorer, cfg, chat_stop(scorer), 'gsm8k')
    else:
        replies = generate([it.contexts[0] for it in items], scorer, cfg, STOP, 'gsm8k')
    strict, flexible = [], []
    for it, reply in zip(items, replies):
        gold = normalise_answer(it.answer)
        s, f = extract(reply)
        strict.append(float(normalise_answer(s) == gold))
        flexible.append(float(normalise_answer(f) == gold))
    return {'exact_match_strict': metric(strict), 'exact_match_flexible': metric(flexible)}, \
        {'replies': replies}, 0.0


def chat_text(scorer, content):
    """The token ids of content as the user's message in the chat format (its text never a control token), after
    the BOS the model expects unless the template wrote it."""
    ids, bos = scorer.style.encode_prompt([{'role': 'user', 'content': content}]), scorer.tok.bos_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def chat_stop(scorer):
    return scorer.style.stop or ['\nUser:']


def run_chat_choices(task, items, scorer, cfg):
    """Chat mode: the question and its lettered options through the chat template; the letter (or yes/no) is
    read from the greedy reply. Unreadable replies count as wrong and are counted."""
    prompts = []
    for it in items:
        q = it.question
        if 'choices' in q:  # BoolQ
            prompts.append(chat_text(scorer, q['text'] + '\nAnswer yes or no.'))
        else:
            prompts.append(chat_text(scorer, q['text'] + '\nAnswer with the letter of the correct option only.'))
    replies = generate(prompts, scorer, cfg, chat_stop(scorer), task, max_new=min(cfg.max_gen_tokens, 16))
    hits, unread = [], 0
    for it, reply in zip(items, replies):
        q = it.question
        if 'choices' in q:
            m = re.search(r'\b(yes|no)\b', reply, re.IGNORECASE)
            pick = q['choices'].index(m.group(1).lower()) if m else None
        else:
            m = re.search(rf'\b([{q["letters"]}])\b', reply)
            pick = q['letters'].index(m.group(1)) if m else None
        unread += pick is None
        hits.append(float(pick == it.gold))
    out = {'acc': metric(hits), 'unreadable': {'value': unread / len(items), 'stderr': None}}
    return out, {'replies': replies}, sum(1 / len(it.question.get('choices', it.question.get('letters', 'AB')))
                                          for it in items) / len(items)


def run_perplexity(task, texts, scorer, cfg):
    """Rolling log-likelihood of each document: token and word perplexity and bits per byte (words and bytes
    counted on the text as stored, before any detokenizing, as lm-eval counts them)."""
    ll, tokens, words, nbytes = 0.0, 0, 0, 0
    for original, text in progress(texts, task):
        ids = scorer.encode(text) if isinstance(text, str) else text  # with BOS where the model adds it, as lm-eval
        logp, scored = scorer.rolling(ids, cfg.batch_size)
        ll, tokens = ll + logp, tokens + scored
        words += len(re.split(r'\s+', original))
        nbytes += len(original.encode('utf-8'))
    if not tokens:
        raise TaskError(f"{task}: the text is empty")
    return {'token_perplexity': {'value': math.exp(-ll / tokens), 'stderr': None},
            'word_perplexity': {'value': math.exp(-ll / words), 'stderr': None},
            'byte_perplexity': {'value': math.exp(-ll / nbytes), 'stderr': None},
            'bits_per_byte': {'value': -ll / nbytes / math.log(2), 'stderr': None}}, \
        {'tokens': tokens, 'words': words, 'bytes': nbytes}, None


def perplexity_texts(task, path, scorer, cfg):
    """[(the stored text, what is scored: text or token ids)]: WikiText's articles detokenized as lm-eval does;
    for 'text', a text file, or a split of a prepare.py folder (its token ids)."""
    if task == 'wikitext':
        pages = wikitext_pages(read_text(path, task))
        if not pages:
            raise TaskError(f"wikitext: '{path}' holds no articles (lines ' = Title = ')")
        return [(p, wikitext_detokenize(p)) for p in subsample(pages, cfg, group=lambda p: '')]
    if os.path.isdir(path):
        ids = eval_data_tokens(SimpleNamespace(eval_data=path, eval_split='val', max_eval_tokens=0), scorer.tok)
        return [(scorer.tok.decode(ids), ids)]
    text = read_text(path, task)
    return [(text, text)]


# ----------------------------------------------------------------------------------------------------------
# the report

CORE_METRIC = {'hellaswag': 'acc_norm', 'arc_easy': 'acc_norm', 'arc_challenge': 'acc_norm', 'piqa': 'acc_norm',
               'openbookqa': 'acc_norm', 'winogrande': 'acc', 'commonsenseqa': 'acc', 'boolq': 'acc',
               'lambada': 'acc', 'mmlu': 'acc', 'gsm8k': 'exact_match_flexible'}


def core_score(results):
    """nanochat's CORE: each task's accuracy centred on its chance level b, (acc - b) / (1 - b), averaged."""
    centred = {}
    for task, r in results.items():
        name = CORE_METRIC.get(task)
        if name == 'acc_norm' and 'acc_norm' not in r['metrics']:  # chat mode reads letters: acc only
            name = 'acc'
        if name and name in r['metrics'] and r.get('chance') is not None:
            b = r['chance']
            centred[task] = (r['metrics'][name]['value'] - b) / (1 - b)
    return (sum(centred.values()) / len(centred) if centred else None), centred


def markdown(report):
    s = report['settings']
    lines = [f"# Report card: {report['model']}", '',
             f"{report['date']} · {report['device']} {report['dtype']} · "
             f"{'chat template' if s['chat'] else 'log-likelihood / few-shot'} · limit {s['limit'] or 'none'}", '',
             '| task | n | metric | value | ± stderr | centred | seconds |',
             '| --- | ---: | --- | ---: | ---: | ---: | ---: |']
    for task, r in report['tasks'].items():
        for name, m in r['metrics'].items():
            if name == 'subjects':
                continue
            pct = not any(w in name for w in ('perplexity', 'bits'))
            fmt = (lambda v: f'{100 * v:.2f}') if pct else (lambda v: f'{v:.4f}')
            err = fmt(m['stderr']) if m.get('stderr') is not None else ''
            cen = report['core']['centred'].get(task)
            cen = f'{100 * cen:.2f}' if cen is not None and name == CORE_METRIC.get(task, '') else ''
            lines.append(f"| {task} | {r['n']} | {name}{' %' if pct else ''} | {fmt(m['value'])} | {err} | {cen} | "
                         f"{r['seconds']:.1f} |")
    if report['core']['value'] is not None:
        lines += ['', f"**CORE** (centred accuracy averaged over {len(report['core']['centred'])} tasks): "
                      f"**{100 * report['core']['value']:.2f}**"]
    for task, msg in report['errors'].items():
        lines += ['', f"- {task}: not run: {msg}"]
    return '\n'.join(lines) + '\n'


def expand_tasks(spec):
    names = []
    for t in (x.strip().lower() for x in spec.split(',') if x.strip()):
        names += CORE_TASKS if t == 'core' else ALL_TASKS if t == 'all' else [t]
    return list(dict.fromkeys(names))


def run_task(task, scorer, cfg):
    t0 = time.time()
    path = find_data(task, cfg)
    data = load_task(task, path, cfg)
    extra = {'fewshot': (FEWSHOT.get(task, 0) if cfg.num_fewshot < 0 else cfg.num_fewshot)
             if task in ('mmlu', 'gsm8k') else 0}
    if task in ('wikitext', 'text'):
        texts = perplexity_texts(task, data, scorer, cfg)
        metrics, details, chance = run_perplexity(task, texts, scorer, cfg)
        n = len(texts)
    else:
        items = subsample(data, cfg)
        n = len(items)
        if task == 'gsm8k':
            metrics, details, chance = run_gsm8k(items, scorer, cfg, cfg.chat)
        elif cfg.chat and all(it.question for it in items):
            metrics, details, chance = run_chat_choices(task, items, scorer, cfg)
        elif task == 'lambada':
            metrics, details, chance = run_lambada(items, scorer, cfg.batch_size)
        else:
            metrics, details, chance = run_choices(task, items, scorer, cfg.batch_size)
        if task == 'boolq':
            chance = 0.5
    return {'n': n, 'metrics': metrics, 'chance': chance, 'data': path, 'sha256': sha256_of(path),
            'seconds': time.time() - t0, **extra}, details


def evaluate(model, tok, cfg, tasks):
    """{task: result} and {task: error} for the task names; a task that cannot run is an error line."""
    scorer = Scorer(model, tok)
    results, errors, details = {}, {}, {}
    for task in tasks:
        if task not in ALL_TASKS + ['text']:
            errors[task] = f"unknown task; choose from {', '.join(ALL_TASKS + ['text', 'core', 'all'])}"
            continue
        try:
            results[task], details[task] = run_task(task, scorer, cfg)
        except (TaskError, UserError) as e:
            errors[task] = str(e).removeprefix(f'{task}: ')
        except ValueError as e:  # e.g. a prompt longer than the model's block_size
            errors[task] = f"the model cannot run it ({e})"
        if task in errors:
            print(f"error: {task}: {errors[task]}")
        else:
            r = results[task]
            shown = ', '.join(f"{k} {v['value']:.4f}" for k, v in r['metrics'].items() if k != 'subjects')
            print(f"{task}: {shown} (n={r['n']}, {r['seconds']:.1f}s)")
    return results, errors, details


def main(argv):
    cfg = parse_config(EvalConfig, argv)
    writable_file(cfg.report, 'report')
    writable_file(cfg.json_out, 'json_out')
    if cfg.limit < 0 or cfg.batch_size < 1 or cfg.max_gen_tokens < 1:
        raise UserError("limit must be >= 0, and batch_size and max_gen_tokens >= 1")
    tasks = expand_tasks(cfg.tasks)
    if not tasks:
        raise UserError(f"--tasks names no task; choose from {', '.join(ALL_TASKS + ['text', 'core', 'all'])}")
    if cfg.data and len(tasks) > 1:
        raise UserError(f"--data is the file of one task, but --tasks names {len(tasks)}: use --data_dir for several")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = load_model(cfg.init_from, device, dtype, cfg.trust_checkpoint)
    if model.config.model_type == 'bert':
        raise UserError("these benchmarks score a decoder (gpt or llama); a bert encoder does not predict text")
    if cfg.pack and device == 'cpu':
        pack_linears(model)
    results, errors, _ = evaluate(model, tok, cfg, tasks)
    core, centred = core_score(results)
    report = {'model': cfg.init_from, 'date': time.strftime('%Y-%m-%d %H:%M'), 'device': device,
              'dtype': str(dtype).replace('torch.', ''), 'settings': asdict(cfg), 'tasks': results,
              'core': {'value': core, 'centred': centred}, 'errors': errors}
    if core is not None:
        print(f"CORE {100 * core:.2f} (centred accuracy over {len(centred)} tasks)")
    json_path = cfg.json_out or (os.path.splitext(cfg.report)[0] + '.json' if cfg.report else '')
    if json_path:
        with atomic_write(json_path) as f:
            json.dump(report, f, indent=2)
    if cfg.report:
        with atomic_write(cfg.report) as f:
            f.write(markdown(report))
        print(f"wrote {cfg.report}" + (f" and {json_path}" if json_path else ''))
    if errors and not results:
        raise UserError(f"no task ran ({len(errors)} failed)")
    return report


if __name__ == '__main__':
    run_cli(main)

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import sample
import train
from train import UserError

from conftest import shared_file
import configurator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=64',
                '--block_size=32', '--batch_size=8', '--max_iters=100', '--eval_interval=100', '--eval_iters=2',
                '--learning_rate=3e-3', '--device=cpu', '--model_type=llama'])
    return out


@pytest.fixture(scope='module')
def loaded(trained):
    return train.load_model(str(trained), 'cpu', 'float32')


def shakespeare():
    return open(shared_file('tinyshakespeare.txt'), encoding='utf-8').read()


def run(*args, stdin=None):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin)


def test_sample_from_a_fresh_checkpoint(trained):
    p = run(f'--init_from={trained}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40', '--seed=1')
    assert p.returncode == 0, p.stderr
    texts = [t for t in p.stdout.split('---------------') if 'ROMEO:' in t]
    assert len(texts) == 1 and texts[0].count('ROMEO:') == 2  # two samples decoded as one batch
    assert all(len(t) > 0 for t in texts[0].split('ROMEO:')[1:])
    again = run(f'--init_from={trained}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40', '--seed=1')
    strip = lambda s: [line for line in s.splitlines() if not line.startswith('-----')]  # noqa: E731 (timings)
    assert strip(again.stdout) == strip(p.stdout)  # the seed makes sampling repeatable


def test_out_dir_is_nanogpts_name_for_init_from(trained, capsys):
    args = ['--start=To be', '--num_samples=1', '--max_new_tokens=10', '--temperature=0', '--device=cpu']
    sample.main([f'--init_from={trained}', *args])
    want = capsys.readouterr().out
    sample.main([f'--out_dir={trained}', *args])
    assert capsys.readouterr().out.split('---')[0] == want.split('---')[0]
    with pytest.raises(UserError, match='not both'):
        sample.main([f'--out_dir={trained}', '--init_from=gpt2'])


def test_greedy_stream_equals_batch_and_generate(trained, loaded, capsys):
    model, tok = loaded
    ids = tok.encode('To be, or not')
    expect = tok.decode(model.generate([ids], 30, temperature=0)[0])
    for stream in (True, False):
        sample.main([f'--init_from={trained}', '--start=To be, or not', '--num_samples=1', '--max_new_tokens=30',
                     '--temperature=0', f'--stream={stream}', '--dtype=float32'])
        assert capsys.readouterr().out.splitlines()[:-1] == expect.splitlines()


def test_overlong_prompt_is_cut_from_the_left(trained):
    p = run(f'--init_from={trained}', '--start=' + 'To be, or not to be' * 5, '--num_samples=1',
            '--max_new_tokens=10', '--temperature=0')
    assert p.returncode == 0, p.stderr
    assert 'has 95 tokens; only the last 31 are seen' in p.stderr


def test_prompts_file_to_jsonl(trained, loaded, tmp_path):
    model, tok = loaded
    prompts = ['ROMEO:', 'JULIET:\nO', 'KING']
    src = tmp_path / 'p.jsonl'
    src.write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in prompts[:2]) + json.dumps(prompts[2]) + '\n')
    out = tmp_path / 'out.jsonl'
    sample.main([f'--init_from={trained}', f'--prompts={src}', f'--output={out}', '--max_new_tokens=12',
                 '--temperature=0', '--batch_size=2', '--stop=\\n\\n', '--dtype=float32'])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['prompt'] for r in records] == prompts
    for r in records:  # batched greedy equals one prompt alone, cut at the stop string
        alone = tok.decode(model.generate([tok.encode(r['prompt'])], 12, temperature=0)[0])[len(r['prompt']):]
        assert r['completion'] == alone.split('\n\n')[0]
        assert r['finish_reason'] == ('stop' if '\n\n' in alone else 'length')
        assert r['prompt_tokens'] == len(r['prompt'])


@pytest.mark.parametrize('content,message', [
    ('{"prompt": "a"}\n{"prompt": \n', 'p.jsonl:2 is not valid JSON'),
    ('{"text": "a"}\n', 'p.jsonl:1 has no "prompt" string'),
    ('\n\n', 'has no prompts'),
])
def test_bad_prompts_files(trained, tmp_path, content, message):
    (tmp_path / 'p.jsonl').write_text(content)
    with pytest.raises(UserError, match=message):
        sample.main([f'--init_from={trained}', f"--prompts={tmp_path / 'p.jsonl'}"])


def test_chat_repl_keeps_history(trained):
    p = run(f'--init_from={trained}', '--chat=True', '--max_new_tokens=8', '--temperature=0',
            stdin='Hello there\n/reset\nGood day\n/quit\n')
    assert p.returncode == 0, p.stderr
    assert 'plain format' in p.stdout and p.stdout.count('> ') == 4


def fake_tok(eos=None):
    table = {1: 'ab', 2: 'c', 3: '\n', 4: 'X', 5: 'Y'}
    return SimpleNamespace(decode=lambda ids: ''.join(table.get(i, '\ufffd') for i in ids), eos_id=eos)


def test_stream_text_is_exact_and_linear_on_real_tokens(monkeypatch):
    # random GPT-2 ids (many end inside a UTF-8 character) and the SmolLM2-style SentencePiece case of leading
    # spaces: the pieces join to the whole text cut before the first stop string, and each id is decoded a
    # bounded number of times (it was decoded again at every step: quadratic)
    import random
    import tiktoken
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))
    enc = tiktoken.get_encoding('gpt2')
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return enc.decode(ids, errors='replace')
    tok = SimpleNamespace(decode=decode, eos_id=None)
    rng = random.Random(0)
    text_ids = enc.encode('Stop here. ' * 3 + 'naïve café — 東京 🙂 ' * 20)
    for trial in range(30):
        ids = [rng.randrange(enc.n_vocab) for _ in range(rng.randrange(1, 300))] if trial % 2 else text_ids
        stop = rng.choice([[], ['\n\n'], ['東京 🙂 naïve'], ['Stop here. Stop', 'é —']])
        decoded.clear()
        got = ''.join(train.stream_text(([t] for t in ids), tok, stop))
        full = enc.decode(ids, errors='replace')
        want = full[:min([full.find(s) for s in stop if s in full], default=len(full))]
        assert got == want, (trial, stop)
        assert sum(decoded) <= 8 * len(ids) + 64, (sum(decoded), len(ids))
    sp = {1: 'Hello', 2: ' world', 3: ',', 4: ' again'}  # decode() drops the text's first leading space
    sp_tok = SimpleNamespace(decode=lambda ids: ''.join(sp[i] for i in ids).removeprefix(' '), eos_id=None)
    ids = [2, 1, 2, 3, 4, 2, 2]
    assert ''.join(train.stream_text(([t] for t in ids), sp_tok)) == sp_tok.decode(ids) == \
        'worldHello world, again world world'


def test_stream_text_holds_back_stop_prefixes_and_cuts_at_stop():
    tok = fake_tok(eos=9)
    steps = [[t] for t in (1, 3, 2, 3, 3, 4)]
    pieces = list(train.stream_text(iter(steps), tok, ['\n\n']))
    assert pieces == ['ab', '\nc', '']  # '\n' waits (it may start '\n\n'); the stop string is never shown
    assert ''.join(train.stream_text(iter([[1], [7], [2], [9], [4]]), tok)) == 'ab\ufffdc'  # EOS ends it
    assert ''.join(train.stream_text(iter([[1], [3], [None]]), tok, ['\n\n'])) == 'ab\n'  # flushed at the end


def test_eval_counts_every_token_once_and_matches_the_model(loaded, trained):
    model, tok = loaded
    ids = tok.encode(shakespeare()[:201])
    r = train.eval_tokens(model, ids, stride=32)  # stride = block_size: plain non-overlapping windows
    losses, hits = [], 0
    for s in range(0, len(ids) - 1, 32):
        x = torch.tensor([ids[s:s + 32]])
        y = torch.tensor(ids[s + 1:s + 33])
        logits = model(x[:, :len(y)])[0][0].float()
        losses.append(F.cross_entropy(logits, y, reduction='sum').item())
        hits += (logits.argmax(-1) == y).sum().item()
    assert r['tokens'] == len(ids) - 1
    assert r['loss'] == pytest.approx(sum(losses) / (len(ids) - 1), rel=1e-5) and r['acc'] == hits / (len(ids) - 1)
    overlapped = train.eval_tokens(model, ids, stride=8)  # more context per token: every token still once
    assert overlapped['tokens'] == len(ids) - 1 and overlapped['loss'] < r['loss']
    assert math.isclose(overlapped['ppl'], math.exp(overlapped['loss']))


def test_eval_on_text_file_and_prepared_split(trained, char_data, tmp_path):  # (moved here from sample.py)
    import eval as E
    text = tmp_path / 'eval.txt'
    text.write_text(shakespeare()[5000:7000])
    r = E.main([f'--init_from={trained}', '--tasks=text', f'--data={text}', '--dtype=float32'])['tasks']['text']
    # a char vocabulary has no BOS or EOS to predict the first character from: the others are scored
    assert r['metrics']['token_perplexity']['value'] < 30 and r['n'] == 1
    r = E.main([f'--init_from={trained}', '--tasks=text', f'--data={char_data}', '--dtype=float32'])['tasks']['text']
    assert 1.0 < r['metrics']['token_perplexity']['value'] < 30


def test_evaluation_keys_point_to_eval_py(trained):
    p = run(f'--init_from={trained}', '--eval_data=x.txt')
    assert p.returncode == 2 and p.stderr.strip().startswith('error: evaluation has moved to eval.py: python eval.py')


@pytest.mark.parametrize('args,message', [
    (['--start=ROMEO \u2603'], "character '\u2603' is not in this dataset's vocabulary"),
    (['--start=FILE:/nonexistent.txt'], "prompt file '/nonexistent.txt' not found"),
    (['--temperature=-1'], 'temperature and top_k >= 0'),
    (['--top_p=0'], 'top_p must be in (0, 1]'),
])
def test_sample_errors(trained, args, message):
    p = run(f'--init_from={trained}', *args)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sample_without_checkpoint(tmp_path):
    p = run(f'--init_from={tmp_path}')
    assert p.returncode == 2 and 'no checkpoint at' in p.stderr


# --- pretrained Hugging Face models -------------------------------------------------------------------------

def test_gpt2_folder_samples_what_transformers_generates(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip('transformers')
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    enc = configurator.tiktoken_encoding('gpt2')
    ids = enc.encode('Hello, my name is')
    with torch.no_grad():
        expect = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    sample.main([f'--init_from={tmp_path}', '--start=Hello, my name is', '--num_samples=1', '--max_new_tokens=12',
                 '--temperature=0', '--dtype=float32'])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == enc.decode(expect[:expect.index(50256)] if 50256 in expect else expect)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_of_a_byte_level_bpe_model(tmp_path, monkeypatch):
    """A Qwen2-style folder: tokenizer.json read by bpe.py, ChatML turns, <|im_end|> ends the reply."""
    transformers = pytest.importorskip('transformers')
    tokenizers = pytest.importorskip('tokenizers')
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([shakespeare()[:20000]], trainer)
    tk.save(str(tmp_path / 'tokenizer.json'))
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
        {'eos_token': '<|im_end|>', 'chat_template': CHATML}))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tk.get_vocab_size(), max_position_embeddings=128)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    model, tok = train.load_model(str(tmp_path))
    style = train.chat_style(tok)
    assert style.name == 'template' and style.stop == ['<|im_end|>'] and tk.token_to_id('<|im_end|>') in tok.eos_id
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    text = train.chat_prompt(messages, style)
    assert text == '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    assert tok.encode(text) == tk.encode(text).ids  # special tokens are single ids, as the tokenizer has them
    p = run(f'--init_from={tmp_path}', '--chat=True', '--system=Be brief.', '--max_new_tokens=5', '--temperature=0',
            stdin='Hello\n')
    assert p.returncode == 0, p.stderr
    assert 'template format' in p.stdout


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_packed_linears_give_the_same_logits_and_tokens(dtype):
    from model import ModelConfig, PackedLinear, build_model, pack_linears
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=97,
                                    block_size=64)).eval().to(dtype)
    x = torch.randint(0, 97, (2, 12))
    logits, greedy = model(x)[0], model.generate(x, 20, temperature=0)
    pack_linears(model)
    assert all(type(m) is PackedLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(model(x)[0].float(), logits.float(), atol=tol, rtol=tol)
    if dtype == torch.float32:
        assert torch.equal(model.generate(x, 20, temperature=0), greedy)


def test_stop_strings_keep_accents_and_read_escapes():
    cfg = sample.SampleConfig(stop='Roméo\\n')
    assert sample.stop_strings(cfg) == ['Roméo\n']

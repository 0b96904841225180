"""A real pretrained chat model through every stage: SmolLM2-135M-Instruct from its GGUF file (../shared/data/models)
chats, serves the OpenAI API, fine-tunes with LoRA and quantizes; and a GGUF of ours loads in every script that
takes --init_from. Kept short (few tokens, few steps) so that the whole file costs CI about two minutes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
from conftest import shared_file
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRANCE = [{'role': 'user', 'content': 'What is the capital of France?'}]
PPL_TOKENS = 4096  # bench.py gguf measures 20k and more; here the ratio's noise is already far below the bounds


@pytest.fixture(scope='module')
def smollm():
    path = shared_file('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    model, tok = train.load_model(path)
    return path, model, tok


def run(script, *args, stdin=''):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def greedy_reply(model, tok, messages, n=24):
    ids = tok.encode(train.chat_prompt(messages, train.chat_style(tok)))
    out = model.generate([ids], n, temperature=0, eos_id=tok.eos_id)[0][len(ids):]
    return tok.decode([t for t in out if t not in tok.eos_id])


def test_chat_prompt_is_the_models_own_template(smollm):
    _, _, tok = smollm
    prompt = train.chat_prompt(FRANCE, train.chat_style(tok))
    assert prompt == ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face'
                      '<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n'
                      '<|im_start|>assistant\n')
    assert train.chat_style(tok).stop == ['<|im_end|>'] and 2 in tok.eos_id


def test_greedy_chat_answers_paris_in_sample_py(smollm):
    path, model, tok = smollm
    assert 'Paris' in greedy_reply(model, tok, FRANCE)
    p = run('sample.py', f'--init_from={path}', '--chat=True', '--temperature=0', '--max_new_tokens=24',
            stdin='What is the capital of France?\n')
    assert p.returncode == 0, p.stderr
    assert 'Paris' in p.stdout and 'template format' in p.stdout


def test_chat_ui_answers_paris_to_the_openai_client(smollm):
    openai = pytest.importorskip('openai')
    import chat_ui
    from test_chat_ui import start
    os.environ['CHAT_UI_QUIET'] = '1'
    server = start(smollm[0])
    try:
        client = openai.OpenAI(base_url=server.url + '/v1', api_key='anything')
        r = client.chat.completions.create(model='tiny', messages=FRANCE, max_tokens=24, temperature=0)
        assert 'Paris' in r.choices[0].message.content and r.choices[0].finish_reason == 'stop'
        chunks = client.chat.completions.create(model='tiny', messages=FRANCE, max_tokens=24, temperature=0,
                                                stream=True)
        assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == r.choices[0].message.content
    finally:
        server.stop()
    assert chat_ui  # imported for start()


def test_lora_sft_lowers_held_out_loss_and_still_answers(smollm, tmp_path):
    import finetune_lora
    records = json.load(open(shared_file('instruct', 'instruction-data.json')))[:32]
    data = tmp_path / 'instruct.json'
    data.write_text(json.dumps(records))
    out = str(tmp_path / 'lora')
    # Alpaca's prompt format is new to the model, so a few steps have something to learn that held-out records share
    finetune_lora.main([f'--init_from={smollm[0]}', f'--data={data}', f'--out_dir={out}', '--template=alpaca',
                        '--mode=lora', '--lora_targets=attn', '--max_iters=8', '--eval_interval=2',
                        '--eval_iters=1', '--batch_size=2', '--block_size=128', '--learning_rate=1e-3',
                        '--min_lr=1e-4', '--warmup_iters=2', '--val_fraction=0.125', '--dtype=float32',
                        '--device=cpu', '--log_interval=10'])
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        val = [r['val_loss'] for r in map(json.loads, f) if 'val_loss' in r]
    assert len(val) == 4 and val[-1] < 0.9 * val[0]  # after 2 steps, and after 8
    model, tok = train.load_model(out)  # the merged model, with the GGUF's tokenizer and chat template
    assert tok.chat_template == smollm[2].chat_template
    assert 'Paris' in greedy_reply(model, tok, FRANCE)


def test_int8_and_int4_perplexity_stay_close(smollm):
    import copy
    from quantize import quantize_model
    _, model, tok = smollm
    text = open(shared_file('wikitext2', 'wiki.valid.tokens'), encoding='utf-8').read()[:PPL_TOKENS * 6]
    ids = torch.tensor(tok.encode(text)[:PPL_TOKENS])
    model = copy.deepcopy(model)
    model.config.block_size = 512  # windows of 512 side by side: the same windows for each model
    base = train.eval_tokens(model, ids, 512)['ppl']
    # int4 in groups of 32: the file's Q4_1 blocks, which groups of 64 cannot hold (+37% there, see quantize.py's
    # note); its table, also the head, kept at 8 bits as it is in the file (4 bits would cost +5.6%)
    for scheme, group, table, bound in (('int8', 64, None, 0.005), ('int4', 32, 'int8', 0.05)):
        q = copy.deepcopy(model)
        quantize_model(q, scheme, group, table_scheme=table)
        ppl = train.eval_tokens(q, ids, 512)['ppl']
        assert ppl <= base * (1 + bound), (scheme, ppl, base)
    assert 5 < base < 60  # a real language model on WikiText, not noise (vocabulary 49,152: noise is ~49k)


# ----------------------------------------------------------------------------------------------------------
# a GGUF of ours, small, through every script that takes --init_from

@pytest.fixture(scope='module')
def small_gguf(tmp_path_factory):
    import bpe
    import weights
    from model import ModelConfig, build_model
    text = open(shared_file('tinyshakespeare.txt')).read()[:30000]
    tok = bpe.train(text, vocab_size=320, special_tokens=(bpe.ENDOFTEXT,))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=320,
                                    block_size=256)).eval()
    folder = tmp_path_factory.mktemp('gguf')
    path = str(folder / 'small.gguf')
    weights.save_gguf(model, path, tok, 'f32')
    (folder / 'text.txt').write_text(text[:3000])
    (folder / 'mc.jsonl').write_text('\n'.join(json.dumps({'ctx': 'ROMEO:', 'endings': [' Ay', ' No'], 'label': i})
                                               for i in range(2)))
    return path, folder


def test_our_gguf_loads_in_every_script(small_gguf, tmp_path):
    path, folder = small_gguf
    p = run('sample.py', f'--init_from={path}', '--start=ROMEO:', '--num_samples=1', '--max_new_tokens=8')
    assert p.returncode == 0, p.stderr
    p = run('eval.py', f'--init_from={path}', '--tasks=text', f"--data={folder / 'text.txt'}")
    assert p.returncode == 0 and 'token_perplexity' in p.stdout, p.stderr
    p = run('quantize.py', f'--init_from={path}', '--mode=int8', f"--eval_data={folder / 'text.txt'}",
            '--decode_tokens=4', f'--out_dir={tmp_path / "q"}')
    assert p.returncode == 0, p.stderr
    p = run('quantize.py', f'--init_from={path}', '--mode=gguf', '--gguf_type=q8_0', f'--out={tmp_path / "q8.gguf"}',
            f"--eval_data={folder / 'text.txt'}")
    assert p.returncode == 0 and 'perplexity' in p.stdout, p.stderr
    records = json.load(open(shared_file('instruct', 'instruction-data.json')))[:8]
    (tmp_path / 'sft.json').write_text(json.dumps(records))
    for mode in ('full', 'qlora'):
        p = run('finetune_lora.py', f'--init_from={path}', f'--mode={mode}', '--max_iters=2', '--eval_interval=2',
                '--eval_iters=1', '--batch_size=2', '--template=chat', f"--data={tmp_path / 'sft.json'}",
                f'--out_dir={tmp_path / mode}')
        assert p.returncode == 0, p.stderr
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'a.txt').write_text('Romeo loves Juliet in Verona.')
    (docs / 'b.txt').write_text('The tempest wrecks a ship near an island.')
    p = run('rag.py', 'index', f'--docs={docs}', f'--index={tmp_path / "idx"}', f'--embed_from={path}')
    assert p.returncode == 0, p.stderr
    p = run('rag.py', 'ask', f'--index={tmp_path / "idx"}', f'--init_from={path}', '--max_new_tokens=8',
            'Who loves Juliet?')
    assert p.returncode == 0, p.stderr

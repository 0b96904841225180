"""finetune_lora.py end to end: instruction tuning learns, only the response is trained on, the merged model
is what sample.py loads, and a resumed run is exact."""
import json
import os

import pytest
import torch

import finetune_lora
import sample
from conftest import shared_file, torchrun
from train import UserError
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip('transformers')


@pytest.fixture(autouse=True)
def tiktoken_cache(monkeypatch):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A tiny GPT-2 in a Hugging Face folder: tiktoken's GPT-2 encoding, 50257 tokens."""
    folder = tmp_path_factory.mktemp('base')
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256,
                                                                      initializer_range=0.3)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def instruct(tmp_path_factory):
    records = json.load(open(shared_file('instruct', 'instruction-data.json')))[:12]
    path = tmp_path_factory.mktemp('data') / 'small.json'
    path.write_text(json.dumps(records))
    return str(path)


def args(base, data, out, **kw):
    a = dict(init_from=base, data=data, out_dir=out, max_iters=30, eval_interval=10, eval_iters=2, batch_size=4,
             learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, block_size=128, dtype='float32', device='cpu',
             log_interval=5, val_fraction=0.25)
    a.update(kw)
    return [f'--{k}={v}' for k, v in a.items()]


def losses(out, key='loss'):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_response_only_targets():
    tok = train.tiktoken_tokenizer('gpt2')
    rec = {'instruction': 'Say hi.', 'input': '', 'output': 'Hi there.'}
    style = train.chat_style(tok)
    (ids, tgt), = finetune_lora.encode_sft([rec], tok, 256, 'alpaca', style, 'x')[0]
    (prompt, _), (response, _) = finetune_lora.sft_segments(rec, 'alpaca', style, 'x')
    p = tok.encode(prompt)
    assert ids == p + tok.encode(response) + [tok.eos_id]
    assert len(tgt) == len(ids) - 1
    for j, t in enumerate(tgt):  # target j predicts ids[j + 1]: masked exactly while that is a prompt token
        assert t == (-100 if j + 1 < len(p) else ids[j + 1])


@pytest.mark.parametrize('mode', ['lora', 'qlora', 'full'])
def test_sft_learns_and_merged_checkpoint_samples(base, instruct, tmp_path, mode):
    out = str(tmp_path / mode)
    finetune_lora.main(args(base, instruct, out, mode=mode, lora_targets='all', max_iters=60, eval_interval=30))
    train_losses = losses(out)
    assert train_losses[-1] < 0.75 * train_losses[0]  # it overfits a dozen examples
    model, tok = train.load_model(out)  # the merged model, as any checkpoint
    assert not any('lora' in n for n, _ in model.named_parameters())
    if mode != 'full':
        assert os.path.getsize(os.path.join(out, 'adapter.pt')) < os.path.getsize(os.path.join(out, 'ckpt.pt')) / 4


def test_resume_is_exact(base, instruct, tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    finetune_lora.main(args(base, instruct, a, max_iters=10, eval_interval=5, lora_dropout=0.1, lr_decay_iters=10))
    finetune_lora.main(args(base, instruct, b, max_iters=5, eval_interval=5, lora_dropout=0.1, lr_decay_iters=10))
    finetune_lora.main(args(base, instruct, b, max_iters=10, eval_interval=5, lora_dropout=0.1, lr_decay_iters=10, resume=True))
    sa = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=True)['model']
    sb = torch.load(os.path.join(b, 'ckpt.pt'), weights_only=True)['model']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('records,message', [
    ([{'question': 'a', 'answer': 'b'}], "expected 'instruction' and 'output'"),
    ([{'messages': [{'role': 'user', 'content': 'a'}]}], 'ending with the assistant'),
])
def test_bad_data_is_a_clear_error(base, tmp_path, records, message):
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(records * 4))
    with pytest.raises(UserError, match=message):
        finetune_lora.main(args(base, str(path), str(tmp_path / 'o')))


def test_target_pattern_that_matches_nothing(base, instruct, tmp_path):
    with pytest.raises(UserError, match="'no_such_layer'.*matches no Linear; Linears are e.g. transformer.h.0.attn.qkv"):
        finetune_lora.main(args(base, instruct, str(tmp_path / 'o'), lora_targets='no_such_layer'))


@pytest.mark.parametrize('path', ['config/lora_gpt2_instruct.py', 'config/qlora_smollm_instruct.py',
                                  'config/bert_classify.py'])
def test_example_configs_parse(path):
    cfg = finetune_lora.parse_config(finetune_lora.FinetuneConfig, [os.path.join(REPO, path)])
    assert cfg.mode in ('lora', 'qlora') and cfg.task in ('sft', 'classify')


def test_lm_task_on_our_own_checkpoint(char_data, tmp_path):
    import train
    base = str(tmp_path / 'base')
    train.main([f'--data_dir={char_data}', f'--out_dir={base}', '--n_layer=2', '--n_head=2', '--n_embd=64',
                '--block_size=32', '--batch_size=8', '--max_iters=30', '--eval_interval=30', '--eval_iters=2',
                '--device=cpu', '--model_type=llama', '--dtype=float32'])
    out = str(tmp_path / 'ft')
    finetune_lora.main([f'--init_from={base}', '--task=lm', f'--data_dir={char_data}', f'--out_dir={out}',
                        '--mode=lora', '--lora_targets=attn', '--max_iters=20', '--eval_interval=10', '--eval_iters=2',
                        '--batch_size=8', '--block_size=32', '--learning_rate=3e-3', '--device=cpu', '--dtype=float32'])
    before = json.loads(open(os.path.join(base, 'metrics.jsonl')).read().splitlines()[-1])['val_loss']
    assert losses(out, 'val_loss')[-1] < before  # adapters on attention alone keep improving it
    model, tok = train.load_model(out)
    assert tok.decode(model.generate([tok.encode('ROMEO:')], 5, temperature=0)[0]).startswith('ROMEO:')


def test_bf16_run_keeps_the_frozen_base_in_bf16_and_merges_in_fp32(base, instruct, tmp_path):
    out = str(tmp_path / 'bf16')
    finetune_lora.main(args(base, instruct, out, dtype='bfloat16', max_iters=40, eval_interval=20))
    assert losses(out)[-1] < 0.85 * losses(out)[0]
    state = torch.load(os.path.join(out, 'train_state.pt'), weights_only=True)['model']
    assert state['transformer.wte.weight'].dtype == torch.bfloat16  # frozen: no fp32 master copy
    assert state['transformer.h.0.attn.qkv.lora_A'].dtype == torch.float32
    merged = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']
    assert merged['transformer.h.0.attn.qkv.weight'].dtype == torch.float32


@pytest.fixture(scope='module')
def bert_base(char_data, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp('bert'))
    train.main([f'--data_dir={char_data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=64',
                '--block_size=64', '--batch_size=8', '--max_iters=20', '--eval_interval=20', '--eval_iters=2',
                '--device=cpu', '--model_type=bert', '--dtype=float32'])
    return out


@pytest.mark.parametrize('mode', ['lora', 'full'])
def test_bert_classification_learns_a_separable_task(bert_base, tmp_path, mode):
    import random
    rnd = random.Random(0)
    words = {'pos': ['good', 'fair', 'sweet', 'gentle'], 'neg': ['foul', 'vile', 'base', 'cruel']}
    rows = [(' '.join(rnd.choice(words[lab]) for _ in range(6)), lab) for lab in ('pos', 'neg') for _ in range(60)]
    path = tmp_path / 'reviews.csv'
    path.write_text('review,sentiment\n' + ''.join(f'{t},{lab}\n' for t, lab in rows))
    out = str(tmp_path / mode)
    finetune_lora.main([f'--init_from={bert_base}', '--task=classify', f'--data={path}', '--text_field=review',
                        '--label_field=sentiment', f'--out_dir={out}', f'--mode={mode}', '--lora_targets=all',
                        '--max_iters=60', '--eval_interval=20', '--eval_iters=2', '--batch_size=16',
                        '--learning_rate=2e-3', '--warmup_iters=5', '--weight_decay=0.0', '--lora_dropout=0.0', '--device=cpu', '--dtype=float32', '--val_fraction=0.2'])
    report = json.load(open(os.path.join(out, 'eval.json')))
    assert report['labels'] == ['neg', 'pos'] and report['n'] == 24
    assert report['accuracy'] >= 0.9 and report['macro_f1'] >= 0.9


def test_classification_errors(bert_base, tmp_path):
    path = tmp_path / 'one.csv'
    path.write_text('text,label\ngood,pos\nfair,pos\n')
    with pytest.raises(UserError, match="has one class"):
        finetune_lora.main([f'--init_from={bert_base}', '--task=classify', f'--data={path}', '--device=cpu'])
    path.write_text('text,kind\ngood,pos\nbad,neg\n')
    with pytest.raises(UserError, match="no 'text' and 'label'"):
        finetune_lora.main([f'--init_from={bert_base}', '--task=classify', f'--data={path}', '--device=cpu'])


def separable_csv(path, n=60):
    import random
    rnd = random.Random(0)
    words = {'pos': ['good', 'fair', 'sweet', 'gentle'], 'neg': ['foul', 'vile', 'base', 'cruel']}
    rows = [(' '.join(rnd.choice(words[lab]) for _ in range(rnd.randint(3, 8))), lab)
            for lab in ('pos', 'neg') for _ in range(n)]
    path.write_text('text,label\n' + ''.join(f'{t},{lab}\n' for t, lab in rows))
    return str(path)


@pytest.mark.parametrize('mode', ['lora', 'full'])
def test_decoder_classification_reads_the_last_real_token(base, tmp_path, mode):
    # rows of different lengths are padded on the right; the head must read each row's own last token
    data, out = separable_csv(tmp_path / 'reviews.csv'), str(tmp_path / mode)
    finetune_lora.main([f'--init_from={base}', '--task=classify', f'--data={data}', f'--out_dir={out}',
                        f'--mode={mode}', '--lora_targets=all', '--max_iters=60', '--eval_interval=30',
                        '--eval_iters=2', '--batch_size=16', '--learning_rate=3e-3', '--warmup_iters=5',
                        '--lora_dropout=0.0', '--device=cpu', '--dtype=float32', '--val_fraction=0.2'])
    report = json.load(open(os.path.join(out, 'eval.json')))
    assert report['labels'] == ['neg', 'pos'] and report['accuracy'] >= 0.9 and report['macro_f1'] >= 0.9
    model, tok = train.load_model(out)  # the merged checkpoint keeps its 2-class head (no bias, as HF's score)
    assert model.classifier.out_features == 2 and model.classifier.bias is None
    a, b = tok.encode('good fair sweet'), tok.encode('foul vile base cruel foul')
    x = torch.full((2, len(b)), 0)
    x[0, :len(a)], x[1] = torch.tensor(a), torch.tensor(b)
    batched = model.classify(x, attention_mask=torch.arange(len(b)) < torch.tensor([[len(a)], [len(b)]]))[0]
    alone = torch.cat([model.classify(torch.tensor([a]))[0], model.classify(torch.tensor([b]))[0]])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_adapter_merges_from_the_command_line_and_refuses_another_base(base, instruct, tmp_path):
    out, merged = str(tmp_path / 'run'), str(tmp_path / 'merged')
    finetune_lora.main(args(base, instruct, out, max_iters=10, eval_interval=10))
    adapter = os.path.join(out, 'adapter.pt')
    # the adapter's own settings are used: a different --lora_r on the command line does not matter
    finetune_lora.main(args(base, instruct, merged, max_iters=0, adapter=adapter, lora_r=2))
    want = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']
    got = torch.load(os.path.join(merged, 'ckpt.pt'), weights_only=True)['model']
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    other = str(tmp_path / 'other')  # same shape, other weights
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256,
                                                         initializer_range=0.3)).save_pretrained(other)
    with pytest.raises(UserError, match='adapter.pt: adapter was trained on a different base model: its weights'):
        finetune_lora.main(args(other, instruct, str(tmp_path / 'x'), max_iters=0, adapter=adapter))
    with pytest.raises(UserError, match=f"adapter.pt is already merged into {out}: pass the base it was trained on"):
        finetune_lora.main(args(out, instruct, str(tmp_path / 'x'), max_iters=0, adapter=adapter))
    with pytest.raises(UserError, match="is not an adapter.pt"):
        finetune_lora.main(args(base, instruct, str(tmp_path / 'x'), max_iters=0, adapter=os.path.join(out, 'ckpt.pt')))
    with pytest.raises(UserError, match="no checkpoint at"):
        finetune_lora.main(args(base, instruct, str(tmp_path / 'x'), max_iters=0, adapter=str(tmp_path / 'none.pt')))


def test_torchrun_two_processes_follow_the_single_process_curve(base, instruct, tmp_path):
    # the LoRA run under DDP: gradients of the adapters alone are all-reduced, the merged checkpoint is written once
    one = args(base, instruct, str(tmp_path / 'one'), max_iters=4, eval_interval=2, gradient_accumulation_steps=2,
               log_interval=1, lora_dropout=0.0)  # dropout masks depend on the rank
    finetune_lora.main(one)
    two = [a.replace(str(tmp_path / 'one'), str(tmp_path / 'two')) for a in one]
    torchrun('finetune_lora.py', two)
    a, b = losses(str(tmp_path / 'one')), losses(str(tmp_path / 'two'))
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    assert os.path.exists(os.path.join(tmp_path / 'two', 'adapter.pt'))


@pytest.mark.parametrize('key', ['n_layer=4', 'n_head=2', 'n_embd=64', 'vocab_size=100', 'dropout=0.1',
                                 'model_type=llama', 'bias=False', 'rope_theta=1e6', 'mlm_probability=0.2'])
def test_model_shape_keys_are_unknown(key):
    # the model is the one init_from names: a shape key would be accepted and then ignored
    with pytest.raises(UserError, match=f"unknown config key '{key.split('=')[0]}' \\(command line\\)"):
        finetune_lora.parse_config(finetune_lora.FinetuneConfig, [f'--{key}'])


def test_cli_refuses_a_model_shape_key_with_one_line():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, 'finetune_lora.py', '--n_layer=4'], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("error: unknown config key 'n_layer' (command line)")


def test_dry_run_sizes_the_loaded_model(base, instruct, tmp_path, monkeypatch, capsys):
    bigger = str(tmp_path / 'bigger')
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_head=2, n_embd=64,
                                                         n_positions=256)).save_pretrained(bigger)
    real, sized = train.estimate_memory, []

    def spy(model, cfg, dtype, model_args):  # what the dry run prints, in bytes (the print rounds to 0.01 GiB)
        sized.append((model_args['n_layer'], model_args['n_embd'], *real(model, cfg, dtype, model_args)))
        return sized[-1][2:]
    monkeypatch.setattr(train, 'estimate_memory', spy)
    for b in (base, bigger):
        finetune_lora.main(args(b, instruct, str(tmp_path / 'o'), dry_run=True))
    out = capsys.readouterr().out
    assert out.count('estimated memory') == 2 and out.count('dry run: one iteration') == 2
    (l1, e1, w1, a1), (l2, e2, w2, a2) = sized
    assert (l1, e1, l2, e2) == (2, 32, 4, 64)  # the bases' shapes, not TrainConfig's 6 x 384
    tokens = 4 * 128  # batch_size x block_size, float32 activations
    assert a1 == tokens * (2 * 32 * 17 * 4 + 50257 * 12) and a2 == tokens * (4 * 64 * 17 * 4 + 50257 * 12)
    assert w1 < w2
    model, _ = train.load_model(base)
    assert w1 < 16 * sum(p.numel() for p in model.parameters())  # LoRA: the frozen base has no grads or AdamW state
    assert not os.path.exists(tmp_path / 'o' / 'ckpt.pt')  # a dry run writes nothing


def test_every_assistant_turn_is_learned_and_nothing_else():
    """A three-turn conversation through SmolLM2's own chat template (ChatML, its default system prompt): the
    learned tokens are exactly the assistant replies with their <|im_end|>, the rest (system, user turns, the
    template's headers) is masked; ShareGPT's form gives the same example; the segments rebuild the rendering."""
    _, tok = train.load_model(shared_file('models', 'SmolLM2-135M-Instruct.Q4_1.gguf'))
    style = train.chat_style(tok)
    msgs = [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'},
            {'role': 'user', 'content': 'Another?'}, {'role': 'assistant', 'content': 'Green.'},
            {'role': 'user', 'content': 'Thanks!'}]  # a last user turn with no reply is dropped
    segments = finetune_lora.sft_segments({'messages': msgs}, 'chat', style, 'x')
    assert ''.join(t for t, _ in segments) == style.render(msgs[:4], add_generation_prompt=False)
    assert [t for t, learned in segments if learned] == ['Blue.<|im_end|>\n', 'Green.<|im_end|>\n']
    (ids, tgt), = finetune_lora.encode_sft([{'messages': msgs}], tok, 512, 'chat', style, 'x')[0]
    learned = [ids[j + 1] for j, t in enumerate(tgt) if t != -100]
    assert tok.decode(learned) == 'Blue.<|im_end|>\nGreen.<|im_end|>\n'
    masked = tok.decode([ids[0]] + [ids[j + 1] for j, t in enumerate(tgt) if t == -100])
    assert 'Name a colour.' in masked and 'Another?' in masked and 'You are a helpful AI assistant' in masked
    assert 'Thanks!' not in tok.decode(ids)
    for j, t in enumerate(tgt):  # token by token: a target is the next token, or -100
        assert t in (-100, ids[j + 1])
    sharegpt = {'conversations': [{'from': 'human', 'value': 'Name a colour.'}, {'from': 'gpt', 'value': 'Blue.'},
                                  {'from': 'human', 'value': 'Another?'}, {'from': 'gpt', 'value': 'Green.'}]}
    assert finetune_lora.encode_sft([sharegpt], tok, 512, 'chat', style, 'x')[0] == [(ids, tgt)]
    with pytest.raises(UserError, match="ShareGPT's conversations of"):
        finetune_lora.encode_sft([{'conversations': [{'from': 'robot', 'value': 'x'}]}], tok, 512, 'chat', style, 'x')

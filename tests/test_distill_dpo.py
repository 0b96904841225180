"""finetune_lora.py's packing, distillation and DPO: packed examples compute as if alone, the losses equal hand
computations, a student moves toward its teacher, DPO learns a preference, LoRA's reference is its own base,
teacher answers are cached, and every task resumes exactly."""
import json
import math
import os

import pytest
import torch
from torch.nn import functional as F

import finetune_lora
import train
from conftest import shared_file
from model import ModelConfig, build_model
from train import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip('transformers')


@pytest.fixture(autouse=True)
def tiktoken_cache(monkeypatch):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', shared_file('tiktoken_cache'))


def hf_gpt2(folder, seed):
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256,
                                                         initializer_range=0.3)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    return hf_gpt2(tmp_path_factory.mktemp('student'), 0)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    return hf_gpt2(tmp_path_factory.mktemp('teacher'), 1)


@pytest.fixture(scope='module')
def instruct(tmp_path_factory):
    records = json.load(open(shared_file('instruct', 'instruction-data.json')))[:16]
    path = tmp_path_factory.mktemp('data') / 'small.json'
    path.write_text(json.dumps(records))
    return str(path)


def args(base, data, out, **kw):
    a = dict(init_from=base, data=data, out_dir=out, max_iters=20, eval_interval=10, eval_iters=2, batch_size=4,
             learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, block_size=128, dtype='float32', device='cpu',
             log_interval=5, val_fraction=0.25)
    a.update(kw)
    return [f'--{k}={v}' for k, v in a.items()]


def metrics(out, key):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def same_weights(a, b):
    sa = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=True)['model']
    sb = torch.load(os.path.join(b, 'ckpt.pt'), weights_only=True)['model']
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------
# packing

@pytest.mark.parametrize('model_type', ['gpt', 'llama'])
def test_packed_examples_compute_exactly_as_alone(model_type):
    """Three examples packed into one row give each the logits it has alone; unpacked, the later ones would
    see the earlier ones (and sit at other positions)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type=model_type, n_layer=2, n_head=2, n_embd=32, vocab_size=50,
                                    block_size=32)).eval()
    examples = [torch.randint(0, 50, (n,)).tolist() for n in (7, 5, 9)]
    rows = finetune_lora.pack_examples([(x, x[1:]) for x in examples], 31)
    (ids, tgt, seg), = rows
    assert seg == [0] * 7 + [1] * 5 + [2] * 9 and ids == sum(examples, [])
    assert tgt == examples[0][1:] + [-100] + examples[1][1:] + [-100] + examples[2][1:]  # nothing predicted across
    packed, _ = model(torch.tensor([ids]), segments=torch.tensor([seg]))
    plain, _ = model(torch.tensor([ids]))
    start = 0
    for x in examples:
        alone, _ = model(torch.tensor([x]))
        assert torch.allclose(packed[0, start:start + len(x)], alone[0], atol=1e-5)
        if start:
            assert not torch.allclose(plain[0, start:start + len(x)], alone[0], atol=1e-3)
        start += len(x)


def test_packed_sft_batch_keeps_segments_and_padding_apart():
    cfg = finetune_lora.FinetuneConfig(batch_size=6, pack=True)
    rows = finetune_lora.pack_examples([([1, 2, 3], [2, 3]), ([4, 5], [5]), ([6, 7, 8, 9], [7, 8, 9])], 6)
    assert rows == [([1, 2, 3, 4, 5], [2, 3, -100, 5], [0, 0, 0, 1, 1]), ([6, 7, 8, 9], [7, 8, 9], [0, 0, 0, 0])]
    (x, seg), y = finetune_lora.sft_batch(rows, cfg, 'train', 0, 0, 'cpu', 0)
    seen = set()
    for i in range(6):  # inputs drop each row's last token; the padding is its own segment, with no targets
        row = (x[i].tolist(), seg[i].tolist(), y[i].tolist())
        assert row in [([1, 2, 3, 4], [0, 0, 0, 1], [2, 3, -100, 5]), ([6, 7, 8, 0], [0, 0, 0, -1], [7, 8, 9, -100])]
        seen.add(row[0][0])
    assert seen == {1, 6}


# ----------------------------------------------------------------------------------------------------------
# distillation

def test_distill_loss_is_the_hand_computed_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0], [1.0, -1.0, 3.0]]])
    y = torch.tensor([[1, -100]])  # only the first position counts
    T = 2.0

    def softmax(v):
        e = [math.exp(a / T) for a in v]
        return [a / sum(e) for a in e]
    p, q = softmax(t[0, 0].tolist()), softmax(s[0, 0].tolist())
    want = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert finetune_lora.distill_loss(s, t, y, T).item() == pytest.approx(want, rel=1e-6)
    # a student vocabulary padded past the teacher's: the extra logits are cut
    padded = torch.cat([s, torch.full((1, 2, 2), 9.0)], -1)
    assert finetune_lora.distill_loss(padded, t, y, T).item() == pytest.approx(want, rel=1e-6)


def test_student_moves_toward_a_fixed_random_teacher(student, teacher, instruct, tmp_path):
    out = str(tmp_path / 'kd')
    finetune_lora.main(args(student, instruct, out, task='distill', teacher=teacher, distill='logits',
                            distill_alpha=1.0, mode='full', max_iters=40, learning_rate=3e-3, eval_interval=10))
    kl = metrics(out, 'val_kl')
    assert len(kl) == 4 and kl[-1] < 0.7 * kl[0]
    assert not any('teacher' in k for k in torch.load(os.path.join(out, 'train_state.pt'),
                                                       weights_only=True)['model'])  # not saved with the student


def test_logit_distillation_needs_the_teachers_tokenizer(student, instruct, tmp_path):
    gguf = shared_file('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    with pytest.raises(UserError, match='--tokenizer_from='):
        finetune_lora.main(args(student, instruct, str(tmp_path / 'o'), task='distill', teacher=gguf, distill='logits'))


def test_logit_distillation_resumes_exactly(student, teacher, instruct, tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    kw = dict(task='distill', teacher=teacher, distill='logits', eval_interval=5, lr_decay_iters=10, pack=True)
    finetune_lora.main(args(student, instruct, a, max_iters=10, **kw))
    finetune_lora.main(args(student, instruct, b, max_iters=5, **kw))
    finetune_lora.main(args(student, instruct, b, max_iters=10, resume=True, **kw))
    assert same_weights(a, b)


def test_sequence_distillation_caches_the_teachers_answers(student, tmp_path, monkeypatch):
    """SmolLM2 (a GGUF, another tokenizer) answers four prompts; the student learns them. A resumed run, and a
    rerun of the same settings, read the answers from out_dir instead of generating them again."""
    gguf = shared_file('models', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    records = [{'instruction': q, 'output': 'x'} for q in
               ('What is the capital of France?', 'Say hello.', 'Name a colour.', 'What is 2 + 2?')]
    data = tmp_path / 'q.json'
    data.write_text(json.dumps(records))
    out = str(tmp_path / 'seq')
    kw = dict(task='distill', teacher=gguf, distill='sequence', gen_max_tokens=40, gen_batch_size=4, max_iters=4,
              eval_interval=2, lr_decay_iters=8)
    finetune_lora.main(args(student, str(data), out, **kw))
    cache = os.path.join(out, 'teacher_answers.jsonl')
    answers = [json.loads(line) for line in open(cache)]
    assert len(answers) == 4 and sum(a['finished'] for a in answers) >= 3
    assert any('Paris' in a['text'] for a in answers)
    before = open(cache).read()

    def no_generation(*a, **k):
        raise AssertionError('the teacher generated again')
    import model as model_module
    monkeypatch.setattr(model_module.Decoder, 'generate', no_generation)
    finetune_lora.main(args(student, str(data), out, **{**kw, 'max_iters': 8}, resume=True))
    assert open(cache).read() == before
    # the student's held-out examples are the teacher's answers: its val loss is measured on them
    assert metrics(out, 'val_loss')


# ----------------------------------------------------------------------------------------------------------
# DPO

def test_dpo_loss_and_rewards_equal_a_hand_computation():
    """Two pairs; vocabulary 3; each answer's response is its last two tokens."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 3)  # rows: chosen 0, chosen 1, rejected 0, rejected 1
    ref_logits = torch.randn(4, 3, 3)
    y = torch.tensor([[-100, 1, 2], [-100, 0, 0], [-100, 2, 1], [-100, -100, 1]])
    beta = 0.5

    def logp(lg, row):
        total = 0.0
        for j, t in enumerate(y[row].tolist()):
            if t != -100:
                total += lg[row, j, t].item() - math.log(sum(math.exp(v) for v in lg[row, j].tolist()))
        return total
    pol = [logp(logits, r) for r in range(4)]
    ref = [logp(ref_logits, r) for r in range(4)]
    chosen = [beta * (pol[i] - ref[i]) for i in (0, 1)]
    rejected = [beta * (pol[i] - ref[i]) for i in (2, 3)]
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)) / 2
    p, r = finetune_lora.sequence_logps(logits, y), finetune_lora.sequence_logps(ref_logits, y)
    assert p.tolist() == pytest.approx(pol, rel=1e-5)
    loss, c, rj = finetune_lora.dpo_loss(p, r, beta)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert c.tolist() == pytest.approx(chosen, rel=1e-5) and rj.tolist() == pytest.approx(rejected, rel=1e-5)


def test_dpo_sft_term_is_the_chosen_cross_entropy():
    """dpo_sft adds w x the chosen rows' mean token cross-entropy (RPO) to DPO's loss, and nothing else."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type='llama', n_layer=1, n_head=2, n_embd=16, vocab_size=20, block_size=8))
    reference = build_model(ModelConfig(model_type='llama', n_layer=1, n_head=2, n_embd=16, vocab_size=20, block_size=8))
    x = torch.randint(0, 20, (4, 6))
    y = torch.randint(0, 20, (4, 6))
    y[:, :2] = -100
    y[1, 5] = -100
    plain, *_ = finetune_lora.DPOLoss(model, 0.3, reference).objective(x, y)
    mixed, *_ = finetune_lora.DPOLoss(model, 0.3, reference, sft_weight=0.7).objective(x, y)
    ce = F.cross_entropy(model(x[:2])[0].reshape(-1, 20), y[:2].reshape(-1), ignore_index=-100)
    assert mixed.item() == pytest.approx(plain.item() + 0.7 * ce.item(), rel=1e-5)


def preference_data(path, n=64, seed=0):
    """A synthetic preference: of two answers that differ only in their last word, the one ending with 'blue'."""
    import random
    rng = random.Random(seed)
    words = 'tree house river stone cloud bird apple road lamp door'.split()
    recs = []
    for _ in range(n):
        body = ' '.join(rng.choice(words) for _ in range(4))
        other = rng.choice(['red', 'green', 'black'])
        recs.append({'prompt': f"Describe the {rng.choice(words)}.", 'chosen': f"{body} blue",
                     'rejected': f"{body} {other}"})
    path.write_text('\n'.join(map(json.dumps, recs)))
    return str(path)


@pytest.mark.parametrize('mode', ['lora', 'full'])
def test_dpo_learns_a_synthetic_preference(student, tmp_path, mode):
    data = preference_data(tmp_path / 'pref.jsonl')
    out = str(tmp_path / mode)
    finetune_lora.main(args(student, data, out, task='dpo', mode=mode, lora_targets='all', beta=0.5, max_iters=150,
                            eval_interval=50, eval_iters=4, batch_size=8, learning_rate=3e-3 if mode == 'full' else 1e-2,
                            min_lr=1e-4, lora_dropout=0.0))
    acc = metrics(out, 'val_reward_acc')
    assert acc[-1] >= 0.9
    margins = metrics(out, 'val_reward_margin')
    assert margins[-1] > margins[0]
    chosen, rejected = metrics(out, 'val_chosen_logp'), metrics(out, 'val_rejected_logp')
    assert chosen[-1] - rejected[-1] > chosen[0] - rejected[0]


def test_dpo_before_training_is_a_coin_toss(student, tmp_path):
    """At step 0 the policy is the reference: every reward is 0, accuracy (ties half) 0.5, loss log 2."""
    data = preference_data(tmp_path / 'pref.jsonl', n=16)
    cfg = train.parse_config(finetune_lora.FinetuneConfig, args(student, data, str(tmp_path / 'o'), task='dpo'))
    cfg.block_size = 128
    task = finetune_lora.finetune_task(cfg, None, 'cpu', True)
    got = task.evaluate(task.model)
    assert got['val_reward_acc'] == 0.5 and got['val_reward_margin'] == 0.0
    assert got['val_loss'] == pytest.approx(math.log(2), rel=1e-6)


def test_lora_reference_is_the_base_without_a_copy(student, tmp_path):
    data = preference_data(tmp_path / 'pref.jsonl', n=16)
    cfg = train.parse_config(finetune_lora.FinetuneConfig, args(student, data, str(tmp_path / 'o'), task='dpo',
                                                                lora_targets='all'))
    task = finetune_lora.finetune_task(cfg, None, 'cpu', True)
    dpo = task.model
    assert dpo.reference == []  # no second model
    base, _ = train.load_model(student)
    n_base = sum(p.numel() for p in base.parameters())
    n_lora = sum(p.numel() for n, p in dpo.named_parameters() if 'lora_' in n)
    assert sum(p.numel() for p in dpo.parameters()) == n_base + n_lora  # the weights exist once
    with torch.no_grad():  # move the adapters: the reference stays the base
        for n, p in dpo.named_parameters():
            if 'lora_B' in n:
                p.normal_()
    x, y = task.batch('val', 0, 0)
    want = finetune_lora.sequence_logps(base(x)[0], y)
    assert torch.allclose(dpo.reference_logps(x, y), want, atol=1e-5)
    assert not torch.allclose(finetune_lora.sequence_logps(dpo.model(x)[0], y), want, atol=1e-3)
    assert dpo.training == task.model.training  # adapters_off restored the mode


def test_dpo_resumes_exactly(student, tmp_path):
    data = preference_data(tmp_path / 'pref.jsonl', n=24)
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    kw = dict(task='dpo', eval_interval=5, lr_decay_iters=10, lora_dropout=0.1)
    finetune_lora.main(args(student, data, a, max_iters=10, **kw))
    finetune_lora.main(args(student, data, b, max_iters=5, **kw))
    finetune_lora.main(args(student, data, b, max_iters=10, resume=True, **kw))
    assert same_weights(a, b)


def test_make_pairs_rejects_the_models_own_answers(student, instruct, tmp_path):
    out = str(tmp_path / 'spin')
    finetune_lora.main(args(student, instruct, out, task='dpo', make_pairs=True, gen_max_tokens=8, gen_temperature=1.0,
                            max_iters=4, eval_interval=2))
    own = [json.loads(line) for line in open(os.path.join(out, 'own_answers.jsonl'))]
    assert len(own) == 16 and all(a['text'] for a in own)
    assert metrics(out, 'val_reward_acc')


@pytest.mark.parametrize('extra,message', [
    (dict(task='dpo'), "has no 'chosen' and 'rejected'.*--make_pairs=True"),
    (dict(task='distill'), 'needs --teacher'),
    (dict(task='sft', teacher='x'), '--teacher is for --task=distill'),
    (dict(task='sft', make_pairs=True), 'needs --task=dpo'),
    (dict(task='distill', distill='soft', teacher='x'), 'distill must be sequence, logits or both'),
    (dict(task='dpo', beta=0), 'beta must be > 0'),
])
def test_bad_settings_are_one_line_errors(student, tmp_path, extra, message):
    path = tmp_path / 'd.json'
    path.write_text(json.dumps([{'instruction': 'a', 'output': 'b'}] * 4))
    with pytest.raises(UserError, match=message):
        finetune_lora.main(args(student, str(path), str(tmp_path / 'o'), **extra))


def test_dpo_reads_chat_message_pairs(student, tmp_path):
    tok = train.tiktoken_tokenizer('gpt2')
    style = train.chat_style(tok)
    cfg = finetune_lora.FinetuneConfig(block_size=128)
    prompt = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'},
              {'role': 'user', 'content': 'Colour?'}]
    rec = {'chosen': prompt + [{'role': 'assistant', 'content': 'Blue.'}],
           'rejected': prompt + [{'role': 'assistant', 'content': 'No.'}]}
    ((ci, ct), (ri, rt)), = finetune_lora.encode_pairs([rec], tok, cfg, style, 'x')[0]
    learned = lambda ids, tgt: tok.decode([ids[j + 1] for j, t in enumerate(tgt) if t != -100])  # noqa: E731
    # the plain format's reply: ' Blue.' and a line end, then the end of text (the earlier reply is prompt)
    assert learned(ci, ct) == ' Blue.\n<|endoftext|>' and learned(ri, rt) == ' No.\n<|endoftext|>'
    assert 'Hello.' in tok.decode(ci)
    flat = {'prompt': 'Colour?', 'chosen': 'Blue.', 'rejected': 'No.'}  # a text prompt: the --template's format
    (ids, tgt), _ = finetune_lora.encode_pairs([flat], tok, cfg, style, 'x')[0][0]
    assert learned(ids, tgt) == 'Blue.<|endoftext|>' and '### Instruction:\nColour?' in tok.decode(ids)
    cfg.template = 'chat'
    (ids, tgt), _ = finetune_lora.encode_pairs([flat], tok, cfg, style, 'x')[0][0]
    assert learned(ids, tgt) == ' Blue.\n<|endoftext|>' and tok.decode(ids).startswith('User: Colour?')


def test_the_chat_path_configs_parse():
    """config/chat's stages parse as the scripts they are for, and chain: each stage starts from the last."""
    from configurator import parse_config
    pre = parse_config(train.TrainConfig, [os.path.join(REPO, 'config', 'chat', 'pretrain.py')])
    dis = parse_config(finetune_lora.FinetuneConfig, [os.path.join(REPO, 'config', 'chat', 'distill.py')])
    dpo = parse_config(finetune_lora.FinetuneConfig, [os.path.join(REPO, 'config', 'chat', 'dpo.py')])
    assert dis.init_from == pre.out_dir and dpo.init_from == dis.out_dir
    assert dis.task == 'distill' and dis.teacher.endswith('.gguf') and dpo.task == 'dpo' and dpo.make_pairs
    assert dpo.data == os.path.join(dis.out_dir, 'teacher_data.jsonl')
    run = open(os.path.join(REPO, 'config', 'chat', 'run.sh')).read()
    assert all(f'config/chat/{n}.py' in run for n in ('pretrain', 'distill', 'dpo'))

"""Generation: the KV cache changes nothing but speed, batching changes nothing, and the sampling options do
exactly what they say."""
import pytest
import torch

from model import ModelConfig, build_model, filter_logits, generate, sample_logits


def tiny(model_type, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(model_type=model_type, n_layer=2, n_head=4, n_embd=64, vocab_size=97, block_size=64, **kw)
    return build_model(cfg).eval()


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


MODELS = [('gpt', {}), ('llama', {}), ('llama', {'n_kv_head': 2, 'rope_theta': 500000.0})]


@pytest.mark.parametrize('model_type,kw', MODELS)
def test_cache_equals_no_cache_greedy(model_type, kw):
    model = tiny(model_type, **kw)
    x = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(x, 30, temperature=0), greedy_without_cache(model, x, 30))


@pytest.mark.parametrize('model_type,kw', MODELS)
def test_batch_of_different_lengths_equals_one_by_one(model_type, kw):
    model = tiny(model_type, **kw)
    prompts = [[5, 6, 7], list(range(10, 22)), [3] * 7]
    batched = model.generate(prompts, 12, temperature=0)
    assert batched == [model.generate([p], 12, temperature=0)[0] for p in prompts]
    assert [len(r) for r in batched] == [3 + 12, 12 + 12, 7 + 12]


def test_generation_goes_past_block_size():
    model = tiny('llama')
    x = torch.randint(0, 97, (2, 60))
    y = model.generate(x, 100, temperature=0)
    assert y.shape == (2, 160) and torch.equal(y[:, :60], x)
    # the first tokens, still inside the window, are those of the no-cache loop
    assert torch.equal(y[:, :64], greedy_without_cache(model, x, 4))


def test_stream_yields_what_generate_returns():
    model = tiny('gpt')
    x = torch.randint(0, 97, (2, 5))
    steps = list(model.generate_stream(x, 8, temperature=0.9, top_k=20, seed=7))
    assert torch.equal(torch.cat((x, torch.tensor(steps).T), 1), model.generate(x, 8, temperature=0.9, top_k=20, seed=7))


def test_module_level_generate_is_the_method():
    model = tiny('llama')
    x = torch.randint(0, 97, (2, 5))
    assert torch.equal(generate(model, x, 6, temperature=0), model.generate(x, 6, temperature=0))


def test_seed_makes_sampling_repeatable():
    model = tiny('gpt')
    x = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(x, 20, temperature=1.0, seed=3)
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a, model.generate(x, 20, temperature=1.0, seed=3))
    assert not torch.equal(a, model.generate(x, 20, temperature=1.0, seed=4))


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=3).isfinite()
    assert kept.tolist() == [[False, True, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=0.3).isfinite().tolist() == [[False, True, False, False]]  # the top stays
    assert filter_logits(logits, min_p=0.3).isfinite().tolist() == [[False, True, True, True]]  # >= 0.15
    assert filter_logits(logits, min_p=0.7).isfinite().tolist() == [[False, True, False, False]]


def test_samples_come_only_from_the_kept_tokens():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, 1.8]]).repeat(4000, 1)
    t = sample_logits(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {1, 2}
    assert sample_logits(logits[:3], temperature=0).tolist() == [1, 1, 1]


def test_repetition_penalty_avoids_seen_tokens():
    model = tiny('gpt')
    x = torch.tensor([[1, 2, 3]])
    plain = model.generate(x, 20, temperature=0)[0, 3:].tolist()
    assert len(set(plain)) < 20  # a random tiny model loops when greedy
    penalised = model.generate(x, 20, temperature=0, repetition_penalty=1e6)[0].tolist()
    assert len(set(penalised)) == len(penalised)


def test_eos_and_stop_strings_end_rows():
    model = tiny('gpt')
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(x, 10, temperature=0)
    eos = free[0, 6].item()  # row 0's fourth new token
    first = free[0, 3:].tolist().index(eos)
    y = model.generate(x, 10, temperature=0, eos_id=eos)
    assert y.shape[1] <= 13 and (y[0, 3 + first:] == eos).all()  # row 0 is filled with its EOS after it
    rows = model.generate(x.tolist(), 10, temperature=0, eos_id=[eos])
    assert rows[0] == free[0, :3 + first + 1].tolist()
    decode = lambda ids: ''.join(chr(ord('A') + i % 26) for i in ids)  # noqa: E731
    text = decode(free[1, 3:].tolist())
    rows = model.generate(x.tolist(), 10, temperature=0, stop=[text[4:6]], decode=decode)
    assert decode(rows[1][3:]).endswith(text[4:6]) and len(rows[1]) <= 3 + 6


def test_bad_prompts_are_clear_errors():
    model = tiny('gpt')
    with pytest.raises(ValueError, match='at least one token'):
        model.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match=r'in \[0, 97\)'):
        model.generate([[1, 200]], 3)
    with pytest.raises(ValueError, match='need decode'):
        model.generate([[1, 2]], 3, stop=['x'])

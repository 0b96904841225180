# A word-level task on the CPU: a small GPT on GPT-2 tokens of pydocs (Python's own help texts and docstrings,
# ~0.4M tokens, offline), where Muon is compared with AdamW (README, "A modern training recipe").
# python prepare.py --dataset=pydocs --tokenizer=gpt2 --out_dir=data/pydocs_gpt2
# python train.py config/pydocs_gpt2.py                        # AdamW
# python train.py config/pydocs_gpt2.py --optimizer=muon --max_iters=300 --out_dir=out-pydocs-muon
out_dir = 'out-pydocs-gpt2'
data_dir = 'data/pydocs_gpt2'
model_type = 'gpt'
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
vocab_size = 50304
dropout = 0.0
batch_size = 8
max_iters = 400
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
beta2 = 0.95
eval_interval = 50
eval_iters = 20
log_interval = 25

# GPT-2 small (124M parameters) with GPT-2's BPE, as nanoGPT trains it on OpenWebText: about 0.5M tokens per
# iteration (12 sequences x 1024 tokens x 40 micro-steps), 600k iterations.
# Check the shape on any machine:  python train.py config/gpt2_124m.py --dry_run=True
# Train on prepared GPT-2-BPE data: torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
out_dir = 'out-gpt2-124m'
data_dir = 'data/fineweb_edu'
model_type = 'gpt'
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # 50257 padded to a multiple of 64: faster matmuls
dropout = 0.0
batch_size = 12
gradient_accumulation_steps = 40
max_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 200
log_interval = 10

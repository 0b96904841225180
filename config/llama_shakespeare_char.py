# A LLaMA-style char model on Tiny Shakespeare: RMSNorm, rotary positions, SwiGLU, grouped-query attention.
# python prepare.py && python train.py config/llama_shakespeare_char.py
out_dir = 'out-llama-shakespeare-char'
data_dir = 'data/shakespeare_char'
model_type = 'llama'
n_layer = 6
n_head = 6
n_kv_head = 2  # three query heads share each key/value head
n_embd = 384
block_size = 256
dropout = 0.0
tie_embeddings = True
batch_size = 16
max_iters = 2000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 25

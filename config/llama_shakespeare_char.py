# A larger LLaMA-style char model on Tiny Shakespeare, nanoGPT's shakespeare_char shape (6 layers, 384 wide,
# block 256) with grouped-query attention and dropout: for a GPU, or a CPU with an hour to spare.
# The 10-minute CPU quick start is config/shakespeare_char.py.
# python prepare.py && python train.py config/llama_shakespeare_char.py
out_dir = 'out-llama-shakespeare-char'
data_dir = 'data/shakespeare_char'
model_type = 'llama'
n_layer = 6
n_head = 6
n_kv_head = 2  # three query heads share each key/value head
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
eval_interval = 250
eval_iters = 200
log_interval = 10
patience = 4  # it overfits Tiny Shakespeare long before 5000 iterations at this size

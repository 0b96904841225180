# A BERT-style encoder trained by masked-language modelling on Tiny Shakespeare (15% of characters hidden,
# 80% of those replaced by [MASK], 10% by a random character, 10% left as they are).
# python prepare.py && python train.py config/bert_shakespeare_char.py
out_dir = 'out-bert-shakespeare-char'
data_dir = 'data/shakespeare_char'
model_type = 'bert'
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.1
mlm_probability = 0.15
batch_size = 16
max_iters = 2000
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 25

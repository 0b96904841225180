# The quick start: a character-level model of Tiny Shakespeare, trained for about ten minutes on any CPU
# (max_minutes times the warmup iterations and fits max_iters to the budget), at most 1,500 iterations (a GPU
# gets there in well under a minute).
# python prepare.py && python train.py config/shakespeare_char.py && python sample.py --init_from=out-shakespeare-char
#
# Why LLaMA-style: with the same shape and budget the GPT-2 architecture reached val loss 1.60 and this one 1.53
# (AdamW, 1,400 iterations): rotary positions need no learning, and SwiGLU and RMSNorm learn faster early on.
# Why Muon: in ten minutes on a 2-core AMD EPYC (fp32, no bf16 instructions) AdamW reached 1.677 in 487
# iterations and Muon 1.561 in 391 (its steps cost ~17% more there); the speedrun's architecture switches on top
# (qk_norm, relu2, zero_init, untied head, softcap) learned more per step but cost as much in speed, 1.561 again
# (python bench.py ablate --minutes=10; README, "A modern training recipe"). Dropout is off: the run is too
# short to overfit much, and on CPU dropout costs ~50% more time per step.
out_dir = 'out-shakespeare-char'
data_dir = 'data/shakespeare_char'
model_type = 'llama'
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.0
batch_size = 16
max_minutes = 9.5
max_iters = 1500
optimizer = 'muon'
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
eval_interval = 250
eval_iters = 20
log_interval = 50

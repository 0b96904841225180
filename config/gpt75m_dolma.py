# The project's headline run: a GPT of ~70M parameters (10 x 640, tied 32k embeddings) trained on 5B tokens of
# Dolma with our own 32k BPE.
#   python bpe.py --input=some_dolma_text.jsonl --vocab_size=32000 --out=tok.model
#   python prepare.py --dataset=dolma --tokenizer=bpe --tokenizer_path=tok.model --max_tokens=5.1e9 --num_proc=16 --out_dir=data/dolma
#   python train.py config/gpt75m_dolma.py --dry_run=True       # shape, token budget, memory estimate
#   torchrun --standalone --nproc_per_node=4 train.py config/gpt75m_dolma.py
# (gradient_accumulation_steps is global: with 8 processes set --gradient_accumulation_steps=8 or more)
out_dir = 'out-gpt75m-dolma'
data_dir = 'data/dolma'
model_type = 'gpt'
n_layer = 10
n_head = 10
n_embd = 640
block_size = 1024
vocab_size = 32000
dropout = 0.0
batch_size = 12
gradient_accumulation_steps = 4
max_iters = 5_000_000_000 // (12 * 4 * 1024)  # 5B tokens at 49,152 tokens per iteration
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95
eval_interval = 2000
eval_iters = 100
log_interval = 50

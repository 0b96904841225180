# Stage 1 of the path to a model that chats (README, "A model that chats, on a CPU"): a small LLaMA pretrained
# on the offline prose in ../shared/data (PEPs, WikiText-2) with our own BPE tokenizer, which reserves ChatML's
# <|im_start|> and <|im_end|> as single ids and carries the chat template into every checkpoint.
# python prepare.py --dataset=text --input='../shared/data/docs/peps/*.rst,../shared/data/wikitext2/wiki.valid.tokens' \
#     --tokenizer=bpe --vocab_size=8192 --out_dir=data/chat_corpus
# python train.py config/chat/pretrain.py
# On a GPU: --n_layer=12 --n_embd=768 --n_head=12 --batch_size=32 --max_iters=5000 --dtype=bfloat16 --compile=True
out_dir = 'out-chat-pretrain'
data_dir = 'data/chat_corpus'
model_type = 'llama'
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.0
batch_size = 16
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 100
eval_iters = 20
log_interval = 50

# LoRA instruction tuning of GPT-2 (124M) on the Alpaca-style records in ../shared/data/instruct:
#   python finetune_lora.py config/lora_gpt2_instruct.py
# then chat with it:
#   python sample.py --init_from=out-lora-gpt2-instruct --prompts=questions.txt --temperature=0
init_from = 'gpt2'
data = '../shared/data/instruct/instruction-data.json'
out_dir = 'out-lora-gpt2-instruct'
mode = 'lora'
task = 'sft'
template = 'alpaca'
lora_r = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = 'all'         # attention and MLP matrices
block_size = 512
batch_size = 4
gradient_accumulation_steps = 4
max_iters = 300
learning_rate = 3e-4
warmup_iters = 20
eval_interval = 50
eval_iters = 10

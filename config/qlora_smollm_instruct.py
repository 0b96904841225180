# QLoRA: a LLaMA-family model's linear weights stored in 4-bit NF4 (block 64, double-quantised scales), LoRA
# adapters on every matrix in full precision; the chat template of the model formats the examples.
#   python finetune_lora.py config/qlora_smollm_instruct.py
init_from = 'hf:HuggingFaceTB/SmolLM2-135M-Instruct'
data = '../shared/data/instruct/instruction-data.json'
out_dir = 'out-qlora-smollm-instruct'
mode = 'qlora'
task = 'sft'
template = 'chat'
lora_r = 16
lora_alpha = 32.0
lora_targets = 'all'
nf4_block = 64
block_size = 512
batch_size = 4
gradient_accumulation_steps = 4
max_iters = 300
learning_rate = 2e-4
grad_checkpoint = True

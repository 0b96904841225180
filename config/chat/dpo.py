# Stage 3: DPO with pairs made offline, SPIN-style: the teacher's answer (out-chat-distill/teacher_data.jsonl)
# is chosen and the student's own sampled answer rejected. LoRA: the reference model is the student with its
# adapters switched off, so no second copy of the weights is kept.
# python finetune_lora.py config/chat/dpo.py
out_dir = 'out-chat-dpo'
init_from = 'out-chat-distill'
task = 'dpo'
data = 'out-chat-distill/teacher_data.jsonl'
make_pairs = True
gen_temperature = 1.0
gen_max_tokens = 160
gen_batch_size = 32
mode = 'lora'
lora_targets = 'all'
lora_r = 16
lora_alpha = 32
beta = 0.1
dpo_sft = 1.0      # + the chosen answers' cross-entropy (RPO): without it DPO lowered both answers'
                   # probabilities and the student's replies fell apart
batch_size = 8
max_iters = 150
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
eval_interval = 50
eval_iters = 10

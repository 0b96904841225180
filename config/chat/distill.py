# Stage 2: the pretrained student learns SmolLM2-135M-Instruct's own answers to the 1,100 instructions in
# ../shared/data/instruct (sequence-level distillation: it works across tokenizers). The teacher answers in its
# ChatML format, batched and KV-cached; its answers are cached in out_dir/teacher_answers.jsonl, so a rerun or
# --resume=True does not generate them again, and out_dir/teacher_data.jsonl holds them as records.
# python finetune_lora.py config/chat/distill.py
out_dir = 'out-chat-distill'
init_from = 'out-chat-pretrain'
task = 'distill'
teacher = '../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf'
distill = 'sequence'
data = '../shared/data/instruct/instruction-data.json'
template = 'chat'
mode = 'full'
pack = True
gen_max_tokens = 160
gen_batch_size = 16
batch_size = 16
max_iters = 150
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
eval_interval = 50
eval_iters = 10

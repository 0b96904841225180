# Sequence classification with a BERT checkpoint (from `python train.py config/bert_shakespeare_char.py`) on a
# CSV with `text` and `label` columns; LoRA adapters plus the pooler and a new classifier head are trained.
#   python finetune_lora.py config/bert_classify.py --data=reviews.csv
# Held-out accuracy and macro-F1 land in out_dir/eval.json; the merged ckpt.pt loads with sample.load_model.
init_from = 'out-bert-shakespeare-char'
task = 'classify'
text_field = 'text'
label_field = 'label'
out_dir = 'out-bert-classify'
mode = 'lora'
lora_targets = 'all'
lora_r = 8
lora_dropout = 0.0
val_fraction = 0.2
batch_size = 16
max_iters = 300
learning_rate = 2e-3
warmup_iters = 10
eval_interval = 50

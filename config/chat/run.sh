#!/usr/bin/env bash
# The whole path to a model that chats, each stage timed: bash config/chat/run.sh [--quick]
# --quick runs the same stages smaller (a few minutes on 2 CPU cores) into out-chat-quick-*; the stages' own
# commands are in the README and in each config file. Extra arguments go to every training stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
quick=0
if [[ "${1:-}" == "--quick" ]]; then quick=1; shift; fi
if (( quick )); then
  tag=out-chat-quick
  pre=(--max_iters=150 --eval_interval=50 --eval_iters=5)
  dis=(--limit=96 --max_iters=40 --eval_interval=20 --eval_iters=4 --gen_max_tokens=96)
  dpo=(--max_iters=30 --eval_interval=15 --eval_iters=4 --gen_max_tokens=64)
  evl=(--limit=50)
else
  tag=out-chat
  pre=(); dis=(); dpo=(); evl=(--limit=500)
fi
stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@"
  echo "== $name took $((SECONDS - t0)) s"
  times+=("$name $((SECONDS - t0)) s")
}
times=()
stage prepare $PY prepare.py --dataset=text --input='../shared/data/docs/peps/*.rst,../shared/data/wikitext2/wiki.valid.tokens' \
  --tokenizer=bpe --vocab_size=8192 --out_dir=data/chat_corpus
stage pretrain $PY train.py config/chat/pretrain.py --out_dir=$tag-pretrain "${pre[@]}" "$@"
stage distill $PY finetune_lora.py config/chat/distill.py --init_from=$tag-pretrain --out_dir=$tag-distill "${dis[@]}" "$@"
stage dpo $PY finetune_lora.py config/chat/dpo.py --init_from=$tag-distill --out_dir=$tag-dpo \
  --data=$tag-distill/teacher_data.jsonl "${dpo[@]}" "$@"
stage eval $PY eval.py --init_from=$tag-dpo --data_dir=../shared/data/eval --tasks=arc_easy,hellaswag,piqa \
  "${evl[@]}" --report=$tag-dpo/eval_report.md
echo "== stage times:"; printf '   %s\n' "${times[@]}"
echo "chat with it: python chat_ui.py --init_from=$tag-dpo   (or python sample.py --init_from=$tag-dpo --chat=True)"

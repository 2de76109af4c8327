#!/usr/bin/env bash
# The README's fine-tuning worked examples on real data, from SmolLM2-135M-Instruct (LoRA), each task:
# finetune -> evaluate (-> predict). Writes runs/smol-{sentiment,ner,qa,dpo} and their predictions; on a 2-core CPU
# the first three took 53 min in the last run, dpo 78 min (the CPU shared with other work). Needs the data and the
# model first (see docs/finetuning.md's "Worked examples on real data"):
#   python bench/real_data.py --fetch                        # -> data/real
#   hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir smollm2-135m   # any HF folder of the model
#   bash bench/real_finetune.sh [SMOLLM2_DIR] [DATA_DIR] [TASKS]     (TASKS: e.g. "dpo"; default: all four)
set -euo pipefail
SM=${1:-$HOME/.cache/megatrain-real-data/smollm2-135m}
D=${2:-data/real}
TASKS=${3:-sentiment ner qa dpo}
want() { [[ " $TASKS " == *" $1 "* ]]; }
common=(--set finetune.init="$SM" --set finetune.lora_rank=8 --set finetune.lora_alpha=16 --set logging.tensorboard=false)

if want sentiment; then
  megatrain finetune --config finetune-classify "${common[@]}" \
    --set finetune.train_file=$D/sentiment/train.jsonl --set finetune.valid_file=$D/sentiment/valid.jsonl \
    --set finetune.test_file=$D/sentiment/test.jsonl --set finetune.max_seq_len=96 --set finetune.epochs=1 \
    --set train.lr=5e-4 --set train.eval_interval=40 --set checkpoint.dir=runs/smol-sentiment
  megatrain evaluate --checkpoint runs/smol-sentiment --input $D/sentiment/test.jsonl
  megatrain predict --checkpoint runs/smol-sentiment --input $D/sentiment/test.jsonl --output runs/smol-sentiment/test-predictions.jsonl
fi

if want ner; then
  megatrain finetune --config finetune-tokens "${common[@]}" \
    --set finetune.train_file=$D/ner/train.conll --set finetune.valid_file=$D/ner/valid.conll \
    --set finetune.test_file=$D/ner/test.conll --set finetune.max_seq_len=128 --set finetune.epochs=2 \
    --set train.lr=1e-3 --set train.eval_interval=50 --set checkpoint.dir=runs/smol-ner
  megatrain evaluate --checkpoint runs/smol-ner --input $D/ner/test.conll
  megatrain predict --checkpoint runs/smol-ner --input $D/ner/test.conll --output runs/smol-ner/test-predictions.jsonl
fi

if want qa; then
  megatrain finetune --config finetune-qa "${common[@]}" \
    --set finetune.train_file=$D/qa/train.json --set finetune.valid_file=$D/qa/valid.json \
    --set finetune.max_seq_len=256 --set finetune.doc_stride=64 --set finetune.epochs=0.5 \
    --set train.lr=1e-3 --set train.eval_interval=40 --set checkpoint.dir=runs/smol-qa
  megatrain evaluate --checkpoint runs/smol-qa --input $D/qa/valid.json
  megatrain predict --checkpoint runs/smol-qa --input $D/qa/valid.json --output runs/smol-qa/valid-predictions.jsonl
fi

# DPO: the gold SQuAD answer preferred over a wrong span of the same context; one pair a micro-batch (its two rows
# differ only in the answer: little padding). The held-out pairs' reference_logp_accuracy is SmolLM2's own
# preference before training (every reward is 0 there), logp_accuracy the tuned model's.
if want dpo; then
  megatrain finetune --config finetune-dpo "${common[@]}" \
    --set finetune.train_file=$D/preference/train.jsonl --set finetune.valid_file=$D/preference/valid.jsonl \
    --set finetune.max_seq_len=320 --set finetune.dpo_beta=0.1 --set finetune.epochs=1 \
    --set train.global_batch_size=4 --set train.micro_batch_size=1 --set train.lr=1e-3 --set train.min_lr=1e-4 \
    --set train.warmup_steps=1 --set train.log_interval=1 --set train.eval_interval=8 --set checkpoint.dir=runs/smol-dpo
  megatrain evaluate --checkpoint runs/smol-dpo --input $D/preference/test.jsonl --batch-size 1
fi

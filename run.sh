#!/usr/bin/env bash
# The whole course at CPU scale, one stage per line: a table of contents.
# Each stage's output is also kept in out/logs/; report.py gathers the tables into out/results.md.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out/logs
export PYTHONUNBUFFERED=1   # progress lines appear as they are printed, through tee too
stage() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; "$@" 2>&1 | tee "out/logs/$name.log"; echo "$name $((SECONDS - t0))" >> out/logs/times.txt; }
rm -f out/logs/times.txt
P=${PRESET:+--preset=$PRESET}   # PRESET=gpu bash run.sh: the larger run for one GPU (README, "Run it")

stage prepare python data/arith/prepare.py                                                   # 1. training records, selection pool, questions, tokenizer
stage base    python sft.py --pretrain --out_dir=out/base $P                                 # 2. base model: arithmetic facts
stage policy  python sft.py --init=out/base/ckpt.pt --out_dir=out/policy --snapshot_step=2000 --snapshot_dir=out/start $P
                                                                                             # 3. the policy: SFT on the training records. Its step 2000, kept in
                                                                                             #    out/start, is where selection's students start: it never saw the pool
stage prm     python train_prm.py --eval --rows=main,response,outcome,confidence $P          # 4. reward design, PRMs, ProcessBench (all rows: drop --rows)
stage select  python select_data.py $P                                                       # 5. offline: data selection from the pool
stage grpo    python grpo.py --variants=rule,mix --seeds=6 $P                                # 6. online: GRPO, rule vs rule + PRM (β = 0.75), harder questions
stage tts     python tts.py $P                                                               # 7. test time: Best-of-N
python report.py                                                                             # out/results.md: every table, with times

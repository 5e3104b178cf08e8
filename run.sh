#!/usr/bin/env bash
# The whole course at CPU scale, one stage per line: a table of contents.
# Each stage's output is also kept in out/logs/; report.py gathers the tables into out/results.md.
#   SEED=n bash run.sh: another pipeline seed: another world (prepare.py) and every stage seeded from n,
#   everything under out/seed<n>/ (its data in out/seed<n>/data/arith, its outputs in out/seed<n>/out)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
SEED=${SEED:-1337}
if [ "$SEED" = 1337 ]; then cd "$ROOT"; else mkdir -p "$ROOT/out/seed$SEED" && cd "$ROOT/out/seed$SEED"; fi
mkdir -p out/logs
export PYTHONUNBUFFERED=1   # progress lines appear as they are printed, through tee too
stage() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; "$@" 2>&1 | tee "out/logs/$name.log"; echo "$name $((SECONDS - t0))" >> out/logs/times.txt; }
rm -f out/logs/times.txt
P=${PRESET:+--preset=$PRESET}   # PRESET=gpu bash run.sh: the larger run for one GPU (README, "Run it")
S="--seed=$SEED --tokenizer=data/arith/tokenizer.tiktoken"   # every stage: this seed's world and seed

stage prepare python "$ROOT/data/arith/prepare.py" --seed="$SEED" --out_dir=data/arith         # 1. training records, selection pool, questions, tokenizer
stage base    python "$ROOT/sft.py" --pretrain --out_dir=out/base $P $S                        # 2. base model: arithmetic facts
stage policy  python "$ROOT/sft.py" --init=out/base/ckpt.pt --out_dir=out/policy --snapshot_step=2000 --snapshot_dir=out/start $P $S
                                                                                             # 3. the policy: SFT on the training records. Its step 2000, kept in
                                                                                             #    out/start, is where selection's students start: it never saw the pool
stage prm     python "$ROOT/train_prm.py" --eval --rows=main,response,outcome,confidence $P $S # 4. reward design, PRMs, ProcessBench (all rows: drop --rows)
stage select  python "$ROOT/select_data.py" $P $S                                              # 5. offline: data selection from the pool
stage grpo    python "$ROOT/grpo.py" --variants=rule,mix --seeds=6 $P $S                       # 6. online: GRPO, rule vs rule + PRM (β = 0.75), half the questions harder
stage tts     python "$ROOT/tts.py" $P $S                                                      # 7. test time: Best-of-N
python "$ROOT/report.py"                                                                       # out/results.md: every table, with times

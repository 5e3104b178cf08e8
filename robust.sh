#!/usr/bin/env bash
# The robustness run: the whole course for several pipeline seeds, then the trends over them.
#   bash robust.sh                     # seeds 1337 1338 1339: three times run.sh's time
#   SEEDS="1337 2024" bash robust.sh   # other seeds
# Each seed is `SEED=n bash run.sh` (another world, every stage seeded from n, its outputs in a folder
# of its own), plus GRPO on the paper's questions (the records' distribution only) as a row of its own.
# report.py --seeds then prints each trend's headline figure per seed and its mean ± std (out/trends.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
SEEDS=${SEEDS:-1337 1338 1339}
for s in $SEEDS; do
  SEED=$s bash "$ROOT/run.sh"
  if [ "$s" = 1337 ]; then dir=$ROOT; else dir=$ROOT/out/seed$s; fi
  (cd "$dir" && python "$ROOT/grpo.py" --variants=rule,mix --seeds=3 --questions=data/arith/rl_questions.jsonl \
     --out_dir=out/grpo_records --seed="$s" --tokenizer=data/arith/tokenizer.tiktoken 2>&1 | tee out/logs/grpo_records.log)
done
python "$ROOT/report.py" --seeds="$(echo $SEEDS | tr ' ' ',')"

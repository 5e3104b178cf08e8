#!/usr/bin/env bash
# The whole course at CPU scale, one stage per line: a table of contents.
set -euo pipefail
cd "$(dirname "$0")"

python data/arith/prepare.py                                             # 1. the distilled pool, questions, tokenizer
python sft.py --pretrain --out_dir=out/base                              # 2. base model: arithmetic facts
python sft.py --init=out/base/ckpt.pt --subset=clean --out_dir=out/sft_clean   # 3a. SFT on the clean part (upper bound)
python sft.py --init=out/base/ckpt.pt --subset=all --out_dir=out/policy        # 3b. SFT on the whole mixed pool: the policy
python sft.py --compare=out/sft_clean,out/policy                          # 3c. the accuracy table

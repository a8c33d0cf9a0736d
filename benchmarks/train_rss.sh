#!/usr/bin/env bash
# Peak RSS of training on the fly at two token counts (default 200k and 1M): each run
# `saekit train` in its own process, its maximum resident set size read with getrusage at
# exit. Flat memory means the two peaks differ by no more than the shuffle buffer's fill.
#   bash benchmarks/train_rss.sh [TOKENS...]
set -euo pipefail
cd "$(dirname "$0")/.."
CHILD="import json, resource, sys; from saekit.cli import main; code = main(sys.argv[1:]); print(json.dumps({'tokens': int(sys.argv[sys.argv.index('--tokens') + 1]), 'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}), file=sys.stderr); sys.exit(code)"
TOKENS=("$@")
[ ${#TOKENS[@]} -gt 0 ] || TOKENS=(200000 1000000)
for T in "${TOKENS[@]}"; do
  OUT=$(mktemp -d)
  .venv/bin/python -c "$CHILD" train --out "$OUT" --tokens $T --hook blocks.1.hook_resid_post \
      --latents 4096 --k 32 --batch-size 4096 --holdout-tokens 32768 2>&1 | grep peak_rss_gib
  rm -rf "$OUT"
done

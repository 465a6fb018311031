#!/usr/bin/env bash
# Train the draft head of the embedded SmolLM2-135M-Instruct on a GPU machine without internet, in one
# command of under 9 minutes, from the repository root (issue 24):
#
#   OUT=/somewhere bash scripts/train_draft_gpu.sh [--quick]
#
# Needs .gguf/part-aa and .gguf/part-ab (`split -b 49M SmolLM2-135M-Instruct.Q4_1.gguf .gguf/part-`),
# which may come in separate calls (carry .gguf/part-aa, then .gguf/part-ab, on the same warm
# machine): each call keeps the parts it finds in /tmp/smollm2-parts, and a call that does not yet
# have both says so and exits 3. Wheels the machine lacks (gguf) come in .whl/.
# Writes $OUT/head/ (the trained head), $OUT/train.json (how it was trained: answers, tokens, epochs,
# validation and held-out acceptance), $OUT/train.log, and $OUT/eval.json (tokens per round trip on
# the held-out chat set: plain vs prompt lookup vs the new head, greedy, identical tokens asserted).
# --quick: a few prompts and tokens on the CPU, to check the whole path in a minute or two.
# Knobs (environment): TRAIN_MINUTES (5.3: train-draft's --max-minutes), GEN_BATCH (768 prompts
# answered at once), EVAL_MINUTES (2.7), STAGE=all|train|eval (eval: measure $HEAD, default $OUT/head, only, so a
# longer training and a longer evaluation can each take one call of the machine).
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python3}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PARTS=${PARTS:-/tmp/smollm2-parts}
GGUF=${GGUF:-/tmp/smollm2.gguf}
mkdir -p "$PARTS" "$OUT"

if [ ! -f "$GGUF" ]; then
  for part in .gguf/part-*; do [ -f "$part" ] && cp "$part" "$PARTS/"; done
  if [ ! -f "$PARTS/part-aa" ] || [ ! -f "$PARTS/part-ab" ]; then
    echo "have: $(ls "$PARTS" | tr '\n' ' '); send the other half in .gguf/ and run this again" >&2
    exit 3
  fi
  cat "$PARTS/part-aa" "$PARTS/part-ab" > "$GGUF.tmp"
  if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" != "$SHA" ]; then
    rm -f "$GGUF.tmp" "$PARTS"/part-*
    echo "the assembled GGUF has the wrong sha256 (parts cleared); send both halves again" >&2
    exit 4
  fi
  mv "$GGUF.tmp" "$GGUF"
fi

if compgen -G ".whl/gguf-*.whl" > /dev/null; then  # only gguf is needed (other carried wheels may not fit this Python)
  "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/gguf-*.whl
fi
export PYTHONPATH=/tmp/site:src:.${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TQDM_MININTERVAL=10

if [ "${1:-}" = "--quick" ]; then
  DEVICE=cpu
  TRAIN=(--prompt-count 6 --max-new-tokens 16 --sampled 0.5 --gen-batch 4 --batch 4 --epochs 2 --heldout-limit 2 --max-minutes 5)
  EVAL=(--limit 1 --new-tokens 16 --max-minutes 2)
else
  DEVICE=cuda
  TRAIN=(--prompt-count 6000 --max-new-tokens 200 --sampled 0.5 --temperature 0.7 --gen-batch "${GEN_BATCH:-768}" --batch 32
         --epochs 40 --max-minutes "${TRAIN_MINUTES:-5.3}")
  EVAL=(--new-tokens 128 --max-minutes "${EVAL_MINUTES:-2.7}")
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi

start=$(date +%s)
STAGE=${STAGE:-all}
if [ "$STAGE" != eval ] && ! "$PY" -m lambdasplit.cli train-draft --model "$GGUF" --split 2,2 --device "$DEVICE" --out "$OUT/head" "${TRAIN[@]}" \
    2> "$OUT/train.log"; then
  tail -n 40 "$OUT/train.log" >&2
  exit 1
fi
if [ "$STAGE" != eval ]; then
  grep "lambdasplit:" "$OUT/train.log" | tail -n 12 || true
  cp "$OUT/head/draft_head.json" "$OUT/train.json"
  echo "trained in $(( $(date +%s) - start )) s"
fi
[ "$STAGE" = train ] && exit 0
HEAD=${HEAD:-$OUT/head}
echo "evaluating $HEAD"
"$PY" scripts/eval_draft.py --model "$GGUF" --head "$HEAD" --device "$DEVICE" --out "$OUT/eval.json" "${EVAL[@]}" \
  2> "$OUT/eval.log" || { tail -n 20 "$OUT/eval.log" >&2; exit 1; }
echo "done in $(( $(date +%s) - start )) s"

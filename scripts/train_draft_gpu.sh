#!/usr/bin/env bash
# Train and measure the draft head of the embedded SmolLM2-135M-Instruct on a GPU machine without
# internet (issue 24), from the repository root, each stage within one device call's 10 minutes:
#
#   OUT=/somewhere bash scripts/train_draft_gpu.sh [--quick]                      # train, then eval
#   OUT=/somewhere STAGE=speculative bash scripts/train_draft_gpu.sh [--quick]    # over the delay proxy
#
# Needs .gguf/part-aa and .gguf/part-ab (`split -b 49M SmolLM2-135M-Instruct.Q4_1.gguf .gguf/part-`),
# which may come in separate calls (carry .gguf/part-aa, then .gguf/part-ab, on the same warm
# machine): each call keeps the parts it finds in /tmp/smollm2-parts, and a call that does not yet
# have both says so and exits 3. Wheels the machine lacks come in .whl/ in any call (gguf; websockets
# for STAGE=speculative), each installed into /tmp/site; one that does not fit this Python is skipped.
# STAGE=all (default) trains, then evaluates; STAGE=train or STAGE=eval runs one of them.
# - train: writes $OUT/head/ (the trained head, also kept in /tmp/draft-head for later calls on the
#   same machine), $OUT/train.json (how it was trained: answers, tokens, epochs, validation and
#   held-out acceptance) and $OUT/train.log.
# - eval: $OUT/eval.json (tokens per round trip on the held-out chat set: plain vs prompt lookup vs
#   $HEAD, greedy, identical tokens asserted) and $OUT/eval.log; its budget is cut to what the
#   call's limit leaves after training.
# - speculative: `python -m benchmarks speculative --body-device cuda`: greedy held-out chat tok/s
#   through the netem delay proxy at 50 and 100 ms, plain vs prompt lookup vs $HEAD, the body served
#   on the GPU and the device's parts on the CPU (SPEC_PARTS=cuda: on the GPU too); $OUT/speculative-body-cuda.json
#   (speculative-body-cuda-parts-cuda.json) and $OUT/speculative.log.
# $HEAD (STAGE=eval or speculative): default .draft/head (a head carried in), else /tmp/draft-head
# (this machine's last training), else the stage stops (exit 7); HEAD=shipped: the shipped head.
# --quick: a few prompts and tokens with everything on the CPU (SPEC_PARTS is ignored, SPEC_CAPS kept), to
# check the whole path in minutes.
# Exit status: 1 a stage failed (or tokens differed: its JSON is written first), 3 half a model,
# 4 a corrupt model, 5 no gguf package, 6 no time left to evaluate, 7 no draft head.
# Knobs (environment): TRAIN_MINUTES (5.3: train-draft's --max-minutes), GEN_BATCH (768 prompts
# answered at once), DATA (/tmp/draft-data.safetensors: train-draft's --data, so a second training
# call on the same warm machine reuses the answers and spends its minutes training), EVAL_MINUTES (2.7; cut to what CALL_SECONDS, 570, leaves after training),
# SPEC_PROMPTS (8), SPEC_TOKENS (64), SPEC_MINUTES (3.5), SPEC_DRAFT (3: longest draft), SPEC_PARTS (cpu: where
# the device's parts run; cuda puts them on the GPU beside the body), SPEC_CAPS (e.g. 6,8: the head again at
# those longest chains), SPEC_TREES (e.g. 16,32: the head's static trees of those sizes, --speculate draft-tree).
set -euo pipefail
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python3}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PARTS=${PARTS:-/tmp/smollm2-parts}
GGUF=${GGUF:-/tmp/smollm2.gguf}
KEEP=${KEEP:-/tmp/draft-head}
STAGE=${STAGE:-all}
case "$STAGE" in all | train | eval | speculative) ;; *) echo "STAGE must be all, train, eval or speculative" >&2; exit 2 ;; esac
mkdir -p "$PARTS" "$OUT"

# One wheel at a time, each into its own directory merged into /tmp/site (`pip --target --upgrade`
# replaces whole top-level directories); a wheel for another Python fails alone.
for wheel in .whl/*.whl; do
  [ -f "$wheel" ] || continue
  rm -rf /tmp/site-one
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-one "$wheel" > /tmp/site-one.log 2>&1; then
    mkdir -p /tmp/site && cp -a /tmp/site-one/. /tmp/site/
  else
    echo "skipped $wheel: $(tail -n 1 /tmp/site-one.log)" >&2
  fi
done
export PYTHONPATH=/tmp/site:src:.${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TQDM_MININTERVAL=10 PYTHONUNBUFFERED=1

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
"$PY" -c "import gguf" 2> /dev/null || { echo "the gguf package is missing: carry its wheel in .whl/" >&2; exit 5; }

if [ "${1:-}" = "--quick" ]; then
  DEVICE=cpu
  TRAIN=(--prompt-count 6 --max-new-tokens 16 --sampled 0.5 --gen-batch 4 --batch 4 --epochs 2 --heldout-limit 2 --max-minutes 5)
  EVAL=(--limit 1 --new-tokens 16)
  EVAL_MINUTES=${EVAL_MINUTES:-2}
  SPEC=(--prompts 1 --new-tokens 8 --max-minutes 5 ${SPEC_CAPS:+--draft-lengths "$SPEC_CAPS"} ${SPEC_TREES:+--trees "$SPEC_TREES"})
else
  DEVICE=cuda
  TRAIN=(--prompt-count 6000 --max-new-tokens 200 --sampled 0.5 --temperature 0.7 --gen-batch "${GEN_BATCH:-768}" --batch 32
         --epochs 40 --max-minutes "${TRAIN_MINUTES:-5.3}" --data "${DATA:-/tmp/draft-data.safetensors}")
  EVAL=(--new-tokens 128)
  SPEC=(--prompts "${SPEC_PROMPTS:-8}" --new-tokens "${SPEC_TOKENS:-64}" --max-minutes "${SPEC_MINUTES:-3.5}"
        --parts-device "${SPEC_PARTS:-cpu}" ${SPEC_CAPS:+--draft-lengths "$SPEC_CAPS"} ${SPEC_TREES:+--trees "$SPEC_TREES"})
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = train ]; then
  if ! "$PY" -m lambdasplit.cli train-draft --model "$GGUF" --split 2,2 --device "$DEVICE" --out "$OUT/head" "${TRAIN[@]}" \
      2> "$OUT/train.log"; then
    tail -n 40 "$OUT/train.log" >&2
    exit 1
  fi
  grep "lambdasplit:" "$OUT/train.log" | tail -n 12 || true
  cp "$OUT/head/draft_head.json" "$OUT/train.json"
  rm -rf "$KEEP" && cp -r "$OUT/head" "$KEEP"
  echo "trained in $SECONDS s"
  [ "$STAGE" = train ] && exit 0
fi

if [ "$STAGE" = all ]; then
  HEAD=$OUT/head
elif [ "${HEAD:-}" = shipped ]; then
  HEAD=src/lambdasplit/device/draft_data/smollm2-135m-instruct
elif [ -z "${HEAD:-}" ]; then
  for HEAD in .draft/head "$KEEP" ""; do [ -z "$HEAD" ] || [ -f "$HEAD/draft_head.json" ] && break; done
  if [ -z "$HEAD" ]; then
    echo "no draft head here: train one first (STAGE=all or train), carry one in .draft/head, or set HEAD=shipped" >&2
    exit 7
  fi
fi
echo "head: $HEAD"

if [ "$STAGE" = speculative ]; then
  [ "$DEVICE" = cuda ] && BODY=cuda || BODY=cpu
  status=0
  "$PY" -m benchmarks speculative --body-device "$BODY" --model "$GGUF" --head "$HEAD" --draft-tokens "${SPEC_DRAFT:-3}" \
    "${SPEC[@]}" --out "$OUT" 2>&1 | tee "$OUT/speculative.log" || status=$?
  echo "done in $SECONDS s"
  exit "$status"
fi

# Eval gets what the call's limit leaves (loading counted by eval_draft.py itself), at most EVAL_MINUTES.
minutes=$(awk -v left="$(( ${CALL_SECONDS:-570} - SECONDS - 30 ))" -v most="${EVAL_MINUTES:-2.7}" \
  'BEGIN { m = left / 60; if (m > most) m = most; printf "%.2f", m }')
if awk -v m="$minutes" 'BEGIN { exit !(m < 0.5) }'; then
  echo "no time left to evaluate ($minutes minutes); run STAGE=eval in another call" >&2
  exit 6
fi
echo "evaluating $HEAD for at most $minutes minutes"
"$PY" scripts/eval_draft.py --model "$GGUF" --head "$HEAD" \
  --device "$DEVICE" --max-minutes "$minutes" --out "$OUT/eval.json" "${EVAL[@]}" \
  2> "$OUT/eval.log" || { tail -n 20 "$OUT/eval.log" >&2; exit 1; }
echo "done in $SECONDS s"

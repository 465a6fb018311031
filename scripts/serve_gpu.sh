#!/usr/bin/env bash
# Run parts of `python3 -m benchmarks serve-gpu` (issue 22) on a GPU machine without internet, inside
# one call's 10 minutes, from the repository root, so that whatever finished comes back:
#
#   OUT=/somewhere PARTS=steps,unsplit bash scripts/serve_gpu.sh [serve-gpu options...]
#
# - Wheels the machine lacks come in .whl/ (websockets, gguf; torchao for the fp8 variants; py-spy for
#   the serve part's profile) and are installed into /tmp/site, never into the machine's Python.
# - The `agreement` part needs the embedded GGUF: carry .gguf/part-* (`split -b 49M` of
#   SmolLM2-135M-Instruct.Q4_1.gguf, as scripts/train_draft_gpu.sh takes them) over one or more calls
#   on the same warm machine; parts are kept in /tmp/smollm2-parts and assembled once the ones there
#   give the right sha256. Without them the part is dropped from PARTS and the others run.
# - Output goes unbuffered to $OUT/serve-gpu.log, and the benchmark writes serve-gpu.json into $OUT
#   (`--out`: the parts run add to a serve-gpu.json already there; on the GPU machine $OUT starts
#   empty; the committed benchmarks/results/serve-gpu.json is neither read nor written) after every
#   part, so a call stopped by its time limit still returns what the finished parts wrote. Merge the
#   JSON of several calls by part (each part writes its own keys).
# - SECONDS_LIMIT (default 560) stops the benchmark before the call's limit.
# - SRC (default src): the lambdasplit package's directory; another checkout's src (`git archive OLD src`)
#   runs that commit's server and client library under this checkout's benchmarks, for an A/B.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python3}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STORE=/tmp/smollm2-parts
export GGUF=${GGUF:-/tmp/smollm2.gguf}
mkdir -p "$OUT" "$STORE"

# One at a time (a wheel for another Python is skipped, not fatal to the rest), each into its own
# directory, merged into /tmp/site: `pip --target --upgrade` replaces whole top-level directories, so
# installing websockets after py-spy straight into /tmp/site dropped bin/py-spy (the 12-06 runs).
for wheel in .whl/*.whl; do
  [ -f "$wheel" ] || continue
  rm -rf /tmp/site-one
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site-one "$wheel" 2>&1 | grep -v WARNING
  mkdir -p /tmp/site && cp -a /tmp/site-one/. /tmp/site/
done
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:${SRC:-src}:.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

for part in .gguf/part-*; do [ -f "$part" ] && cp "$part" "$STORE/"; done
if [ ! -f "$GGUF" ] && compgen -G "$STORE/part-a?" > /dev/null; then
  cat "$STORE"/part-a? > "$GGUF.tmp"
  if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" = "$SHA" ]; then mv "$GGUF.tmp" "$GGUF"; else rm -f "$GGUF.tmp"; fi
fi
PARTS=${PARTS:-unsplit,steps}
if [ ! -f "$GGUF" ] && [[ ",$PARTS," == *",agreement,"* ]]; then
  echo "no GGUF yet (have: $(ls "$STORE" | tr '\n' ' ')): dropping the agreement part" | tee -a "$OUT/serve-gpu.log"
  PARTS=$(echo ",$PARTS," | sed 's/,agreement,/,/; s/^,//; s/,$//')
fi
[ -n "$PARTS" ] || exit 3

timeout "${SECONDS_LIMIT:-560}" "$PY" -m benchmarks serve-gpu --parts "$PARTS" --out "$OUT" "$@" 2>&1 \
  | grep --line-buffered -v -i "warn" | tee -a "$OUT/serve-gpu.log"
exit "${PIPESTATUS[0]}"

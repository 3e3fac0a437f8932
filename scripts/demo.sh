#!/usr/bin/env bash
# The main job: install, teach the embedded model one example subject with ZOODiP (int8 weights,
# forward passes only), then render it in new scenes. Result: out/demo/result.png
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECT=${SUBJECT:-teal_bag}
if [ ! -f "examples/subjects/$SUBJECT/subject.json" ]; then
  echo "demo.sh: error: unknown SUBJECT '$SUBJECT'; known subjects: $(ls examples/subjects | tr '\n' ' ')" >&2
  exit 2
fi
./scripts/setup_env.sh
. .venv/bin/activate
CLASS=$(python -c "import json;print(json.load(open('examples/subjects/$SUBJECT/subject.json'))['class_word'])")
RUN=out/demo/$SUBJECT
[ -f "$RUN/run.json" ] && rm -rf "$RUN" "$RUN-samples"     # a finished demo is done again from scratch
RESUME=()
[ -d "$RUN" ] && [ -n "$(ls -A "$RUN")" ] && RESUME=(--resume)   # an interrupted one continues
quantdream personalize --images "examples/subjects/$SUBJECT" --token "<$SUBJECT>" --init-word "$CLASS" \
  --out "$RUN" "${RESUME[@]}" "$@"
rm -rf "$RUN-samples"
quantdream generate --embedding "$RUN/learned_embeds.safetensors" -n 4 --out "$RUN-samples" \
  "a {} on a green background" "a {} at the top left" "a red {}" "a {} next to a sneaker"
cp "$RUN-samples/grid.png" out/demo/result.png
echo "Reference photos: examples/subjects/$SUBJECT/   Result: out/demo/result.png   Run record: $RUN/run.json"

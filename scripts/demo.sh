#!/usr/bin/env bash
# The main job: install, teach the embedded model one example subject with ZOODiP (int8 weights,
# forward passes only), then render it in new scenes. Result: out/demo/result.png
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
. .venv/bin/activate
SUBJECT=${SUBJECT:-teal_bag}
CLASS=$(python -c "import json;print(json.load(open('examples/subjects/$SUBJECT/subject.json'))['class_word'])")
quantdream personalize --images "examples/subjects/$SUBJECT" --token "<$SUBJECT>" --init-word "$CLASS" \
  --out out/demo/run "$@"
quantdream generate --embedding out/demo/run/learned_embeds.safetensors -n 4 --out out/demo/samples \
  "a {} on a green background" "a {} at the top left" "a red {}" "a {} next to a sneaker"
cp out/demo/samples/grid.png out/demo/result.png
echo "Reference photos: examples/subjects/$SUBJECT/   Result: out/demo/result.png   Run record: out/demo/run/run.json"

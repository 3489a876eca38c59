#!/usr/bin/env bash
# The whole job on the bundled example: convert -> inspect -> split -> train -> evaluate -> serve.
# Outputs go to ./example-output (made afresh each run; a directory this script did not make is refused).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-example-output}"
# Never delete what this script did not make: an existing output directory must carry its marker.
if [ -e "$out" ] && [ ! -e "$out/.wals-ooc-example" ]; then
  echo "error: $out exists and was not made by this example; choose another output directory" >&2
  exit 2
fi
rm -rf "$out" && mkdir -p "$out" && touch "$out/.wals-ooc-example"

wals-ooc convert "$here/plays.csv" "$out/plays.zarr" --user-col user --item-col artist --value-col plays --row-block 64 -q
wals-ooc info "$out/plays.zarr"
wals-ooc split "$out/plays.zarr" "$out/train.zarr" "$out/test.zarr" --test-fraction 0.2 --seed 1 -q
wals-ooc train "$out/train.zarr" --model "$out/model.zarr" --factors 32 --iterations 10 --alpha 2 --regularization 0.05 --seed 0
wals-ooc evaluate "$out/model.zarr" "$out/test.zarr" -k 10
wals-ooc recommend "$out/model.zarr" --users listener_0000 listener_0001 -n 5
wals-ooc similar "$out/model.zarr" --items artist_000 -n 5
wals-ooc recommend "$out/model.zarr" --all --output "$out/top10.parquet" --format parquet -n 10
echo "done: stores, model and recommendations are in $out/"

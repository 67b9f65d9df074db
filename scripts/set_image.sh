#!/usr/bin/env bash
# Names one image in every place that runs it: cluster.yaml (docker.image) and every container of
# k8s/*.yaml. The current name is read from cluster.yaml and replaced wherever it appears as an image, so
# the files always agree (tests/test_manifests.py checks that they do).
#
#   scripts/set_image.sh 123456789012.dkr.ecr.us-west-2.amazonaws.com/calm-ray:0.1.0-ray2.60.0-py311-gpu-3f2c1ab
set -euo pipefail
cd "$(dirname "$0")/.."
new=${1:?usage: scripts/set_image.sh <registry>/<name>:<tag>}
case "$new" in
  *[[:space:]#\&\\]*) echo "set_image.sh: '$new' is not an image reference" >&2; exit 2 ;;
esac
old=$(sed -n -E '/^docker:/,/^[^ #]/ s/^  image: *([^ #]+).*/\1/p' cluster.yaml | head -n1)
[ -n "$old" ] || { echo "set_image.sh: no docker.image in cluster.yaml" >&2; exit 1; }
esc=$(printf '%s' "$old" | sed -e 's/[.[\*^$/]/\\&/g')
for f in cluster.yaml k8s/*.yaml; do
  sed -i -E "s#^([[:space:]-]*image: *)${esc}([[:space:]]|\$)#\1${new}\2#" "$f"
done
echo "image: $old -> $new"
grep -n -E '^[[:space:]-]*image:' cluster.yaml k8s/*.yaml

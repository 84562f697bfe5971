#!/usr/bin/env bash
# The relay before and after a change, side by side: `python -m bench.passthrough` (default
# settings) in a worktree of BEFORE and in this tree, alternately, ROUNDS times each, so
# the machine's drift hits both alike. Prints each run; the worktree is removed after.
#   bash bench/passthrough_alternate.sh 589406b 2 | tee /tmp/alternate.log
set -euo pipefail
before=${1:?usage: bench/passthrough_alternate.sh BEFORE_REF [ROUNDS]}
rounds=${2:-2}
here=$(git rev-parse --show-toplevel)
tree=$(mktemp -d)/before
git -C "$here" worktree add -q --detach "$tree" "$before"
ln -s "$here/.venv" "$tree/.venv"
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    dir=$here; [ "$side" = before ] && dir=$tree
    echo "=== round $round: $side ($(git -C "$dir" rev-parse --short HEAD)) ==="
    (cd "$dir" && timeout 900 .venv/bin/python -m bench.passthrough 2>&1)
  done
done

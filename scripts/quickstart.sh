#!/usr/bin/env bash
# The main job: adapt a small model with RankMoE on a made-up task and print a routing summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/ensure_env.sh")"
cd "$root"
exec "$python" examples/quickstart.py "$@"

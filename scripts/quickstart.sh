#!/usr/bin/env bash
# The main job: MoR on the pretrained Real-ESRGAN x4plus, offline on a CPU (recipes/real_isr/finetune_realesrgan.py).
# Extra flags go to the script, e.g. --steps 50 or --output_dir /tmp/run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/ensure_env.sh")"
cd "$root"
exec "$python" recipes/real_isr/finetune_realesrgan.py --config recipes/real_isr/configs/realesrgan-mor.yaml "$@"

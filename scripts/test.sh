#!/usr/bin/env bash
# The whole test suite: our tests, PEFT's own generic tuner tests with RankMoE rows, the quickstart's
# smoke run, and the strict documentation build. Creates the environment when it is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/ensure_env.sh")"
bin="$(dirname "$python")"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
workers="${PYTEST_WORKERS:-2}"

echo "== rankmoe tests"
"$python" -m pytest tests rankmoe integrations --doctest-modules --ignore=tests/upstream -n "$workers" -p no:cacheprovider "$@"

echo "== PEFT's generic tuner tests with RankMoE rows"
"$python" scripts/fetch_peft_tests.py
"$python" -m pytest tests/upstream -k RankMoE -p no:cacheprovider -q  # serial: faster than -n 2 here (one collection of 21k upstream items)

echo "== quickstart smoke run"
out="$(mktemp -d)"
"$python" examples/quickstart.py --steps 20 --out "$out/adapter" > "$out/log.txt"
grep -q "outputs identical = True" "$out/log.txt"
rm -rf "$out"

echo "== documentation (mkdocs build --strict)"
site="$(mktemp -d)"
"$bin/mkdocs" build --strict --quiet -d "$site"
rm -rf "$site"
echo "all checks passed"

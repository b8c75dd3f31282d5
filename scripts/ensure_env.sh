#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with rankmoe and its test/docs extras.
# Re-installs only when pyproject.toml changed since the last install. Prints the venv's python path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RANKMOE_VENV:-$root/.venv}"
extras="${RANKMOE_EXTRAS:-test,docs}"
stamp="$venv/.rankmoe-installed-$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  python_bin="$(command -v python3.11 || command -v python3)"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment in $venv ($("$python_bin" --version))" >&2
    "$python_bin" -m venv "$venv"
  fi
  echo "installing rankmoe[$extras] into $venv (first run: a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$root[$extras]" >&2
  rm -f "$venv"/.rankmoe-installed-*
  touch "$stamp"
fi
echo "$venv/bin/python"

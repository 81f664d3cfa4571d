#!/usr/bin/env bash
# Installs the standard clients the interop tests (tests/interop.rs) run, from the lockfiles
# next to this script: py-spiffe, grpcio, grpcio-health-checking and grpcio-reflection into a
# virtualenv (target/interop/venv), @grpc/grpc-js, @grpc/proto-loader and jose into
# tests/interop/node_modules. Idempotent: a lockfile unchanged since the last install is not
# installed again. A missing python3 or npm is an error, never a skip.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${EPHEMERA_INTEROP_VENV:-$root/target/interop/venv}"

command -v python3 >/dev/null || { echo "interop: python3 is required" >&2; exit 1; }
command -v npm >/dev/null || { echo "interop: npm (Node.js) is required" >&2; exit 1; }

stamp() { sha256sum "$1" | cut -d' ' -f1; }

# One install at a time (parallel test binaries may call this together).
mkdir -p "$(dirname "$venv")"
exec 9>"$(dirname "$venv")/.setup.lock"
flock 9

if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$(stamp "$here/requirements.txt")" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    -r "$here/requirements.txt"
  stamp "$here/requirements.txt" > "$venv/.requirements"
fi

if [ "$(cat "$here/node_modules/.lock-stamp" 2>/dev/null)" != "$(stamp "$here/package-lock.json")" ]; then
  (cd "$here" && npm ci --silent --no-audit --no-fund --ignore-scripts)
  stamp "$here/package-lock.json" > "$here/node_modules/.lock-stamp"
fi
echo "$venv/bin/python"

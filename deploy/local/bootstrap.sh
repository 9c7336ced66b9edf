#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, idempotently and quickly
# when everything is already there: system packages (PostgreSQL, Java 17, Maven) and
# the project's virtualenv (.venv) with its Python dependencies.
# Usage: deploy/local/bootstrap.sh [--test]   (--test adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
if [ "${1:-}" = "--test" ]; then
  # The snippet's tests: Node's test runner, and Debian's Chromium for the browser tests.
  command -v node >/dev/null || need+=(nodejs npm)
  command -v chromium >/dev/null || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (install them, or run this as root)" >&2
    exit 1
  fi
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's package creates and starts a default cluster on 5432; the project runs its own.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
  fi
fi

PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
# Re-install only when pyproject.toml (or the extras) changed since the last install.
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)${extras:+-test}"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# terser, to check that snippet/t.min.js is the minified snippet/t.js (npm ci only when the lock changed).
if [ "${1:-}" = "--test" ]; then
  npm_stamp="snippet/node_modules/.installed-$(sha1sum snippet/package-lock.json | cut -c1-12)"
  if [ ! -f "$npm_stamp" ]; then
    (cd snippet && npm ci --no-audit --no-fund --loglevel=error)
    touch "$npm_stamp"
  fi
fi

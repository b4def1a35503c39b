#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target for a few seconds (default 8 s
# each, 40 s in all; SMOKE_SECONDS=N to change), starting from the committed
# corpus and seeds. A crash or a violated property fails the run; the input
# is left in fuzz/artifacts/<target>/ (git-ignored).
#
# cargo-fuzz needs a nightly toolchain. This script installs what is missing
# (`rustup toolchain install nightly --profile minimal`, then
# `cargo install cargo-fuzz --locked`) and fails with a clear message if it
# cannot: it never skips silently. The first run compiles ivrguard and its
# dependencies with the fuzzing instrumentation (several minutes); later
# runs reuse fuzz/target.
#
# The committed corpus is read, never written: new inputs go to a temporary
# directory that is deleted afterwards. Long runs, minimisation and what was
# found are described in SECURITY.md ("Fuzzing").
set -euo pipefail

FUZZ="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGETS=(form_rewrite signature_settings url_candidates config_load json_rewrite pipeline_prepare)
SECONDS_EACH="${SMOKE_SECONDS:-8}"
# The build flags of the long runs: release, with debug assertions and
# overflow checks; no sanitizer (ivrguard has no `unsafe`; see SECURITY.md).
BUILD_FLAGS=(--release --debug-assertions --sanitizer none)

die() { printf '\nfuzz smoke: ERROR: %s\n' "$*" >&2; exit 1; }
START=$SECONDS

command -v rustup >/dev/null 2>&1 \
  || die "rustup not found: cargo-fuzz needs a nightly toolchain, installed with rustup (https://rustup.rs)"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz smoke: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
  rustup toolchain install nightly --profile minimal \
    || die "could not install the nightly toolchain, which cargo-fuzz needs"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz smoke: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked || die "could not install cargo-fuzz"
fi
echo "fuzz smoke: $(rustup run nightly rustc --version), $(cargo fuzz --version)"

cd "$FUZZ"
# Build against the versions the main crate pins (fuzz/ is its own workspace).
cp ../Cargo.lock Cargo.lock
cargo +nightly fuzz build "${BUILD_FLAGS[@]}" || die "the fuzz targets do not build"
echo "fuzz smoke: built in $((SECONDS - START))s"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/ivrguard-fuzz-smoke.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
for target in "${TARGETS[@]}"; do
  mkdir -p "$SCRATCH/$target"
  echo "fuzz smoke: $target for ${SECONDS_EACH}s"
  # The first corpus directory receives new inputs: the scratch one.
  if cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" \
    "$SCRATCH/$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 \
    >"$SCRATCH/$target.log" 2>&1; then
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$SCRATCH/$target.log" | sed 's/^/  /'
  else
    # The panic message (which property), then libFuzzer's summary.
    grep -A 3 'panicked at' "$SCRATCH/$target.log" >&2 || true
    grep -E '^(==[0-9]+== ERROR|SUMMARY|artifact_prefix|Test unit written)' "$SCRATCH/$target.log" >&2 \
      || tail -n 20 "$SCRATCH/$target.log" >&2
    die "$target failed: the input is in fuzz/artifacts/$target/; replay it with
  cargo +nightly fuzz run ${BUILD_FLAGS[*]} $target fuzz/artifacts/$target/<file>"
  fi
done
echo "fuzz smoke: all ${#TARGETS[@]} targets passed in $((SECONDS - START))s"

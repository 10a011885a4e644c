#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, one after another, on one core.
# New inputs go to fuzz/work/TARGET (not committed), crashes to fuzz/artifacts/TARGET; copy a
# crash into tests/fixtures/fuzz/TARGET/ once fixed, so that stable `cargo test` runs it.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
for t in image record weights checkpoint snapshot; do
  mkdir -p "work/$t"
  echo "== $t: $seconds s"
  cargo +nightly fuzz run -s none "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 || echo "== $t FAILED"
done

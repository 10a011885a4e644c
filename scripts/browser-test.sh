#!/usr/bin/env bash
# The page of `lookalike serve` in a real browser (tests/browser/page.test.mjs): Debian's
# chromium driven by playwright-core from npm (no browser download). Run by scripts/test.sh
# after the Rust tests; skipped, with a line that says so, when node or chromium is missing
# (.ci/run installs both). Screenshots go to target/browser-figures/, or with --update-figures
# to docs/figures/ (the ones docs/serve.md shows).
set -euo pipefail
cd "$(dirname "$0")/.."
chromium="${CHROMIUM:-/usr/bin/chromium}"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1 || [ ! -x "$chromium" ]; then
  echo "browser test SKIPPED: needs node, npm and $chromium (Debian: apt-get install nodejs npm chromium)"
  exit 0
fi
(cd tests/browser && { [ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund; })
figures=target/browser-figures
[ "${1:-}" = "--update-figures" ] && figures=docs/figures
cargo build --release --bin lookalike
CHROMIUM="$chromium" node tests/browser/page.test.mjs target/release/lookalike \
  examples/data/fashion-mnist-sample "$figures"

#!/usr/bin/env bash
# The test command of the README: unit, integration, doc and crash tests of the workspace, then
# the page of `lookalike serve` in a real browser (skipped, saying so, without node and
# chromium). Release mode: the same build as the demo (FAISS is compiled once), and fast
# enough for the crash loop.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --release --workspace
./scripts/browser-test.sh

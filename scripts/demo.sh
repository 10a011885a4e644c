#!/usr/bin/env bash
# The demo of the README: builds lookalike and runs the quickstart on the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo run --release --example quickstart

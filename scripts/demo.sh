#!/usr/bin/env bash
# The main job (README): `multifd demo` in a release build. It generates a deterministic 1 GiB guest
# image (40% zero pages), migrates it over loopback from the multifd-rs sender to the multifd-rs
# receiver in several rounds (pages dirtied between rounds), verifies the destination byte for byte
# and prints a summary. Arguments are passed on (e.g. --size 64M --channels 2 --json).
# Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
cargo build --release -q -p multifd-std --bin multifd
exec ./target/release/multifd demo "$@"

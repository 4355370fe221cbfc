#!/usr/bin/env bash
# The main job (README): until the send and receive engines land, it boots the bare-metal firmware
# demo in qemu-system-arm and prints its decoded defmt log. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
exec cargo fw

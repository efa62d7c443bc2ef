#!/usr/bin/env bash
# Builds the benchmark's minimal PVH guest: build.sh [OUT] (default target/bench/tiny.elf).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/bench/tiny.elf}
mkdir -p "$(dirname "$out")"
gcc -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments -Wl,-e,pvh_start \
    -Wl,-T,"$here/tiny.ld" -Wl,-z,noexecstack -Wl,-z,max-page-size=0x1000 -o "$out" "$here/tiny.S"
echo "$out"

#!/usr/bin/env bash
# Builds the benchmark's minimal PVH guests into OUTDIR (default target/bench/):
#   tiny.elf       prints one line on COM1, then resets (the VMM exits);
#   tiny-halt.elf  prints the same line, then halts forever (for measuring memory).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/bench}
mkdir -p "$out"
build() {
    gcc -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
        -Wl,-T,"$here/tiny.ld" -Wl,-z,noexecstack -Wl,-z,max-page-size=0x1000 "$@"
}
build -o "$out/tiny.elf" "$here/tiny.S"
build -DHALT_AFTER_PRINT -o "$out/tiny-halt.elf" "$here/tiny.S"

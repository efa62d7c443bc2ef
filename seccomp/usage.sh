#!/usr/bin/env bash
# seccomp/usage.sh [TEST-BINARY...]: which system calls each kind of podvm thread really
# makes, against what its filter allows.
#
# Runs the guest test binaries (default: every tests/tests/guest_*.rs) with
# PODVM_TEST_STRACE set, so each podvm they start runs under `strace -ff` (one file per
# thread); the cargo runner then prints each (thread kind, call) made after that thread
# installed its filter. This script unions them over all the binaries and prints, per
# thread kind, the calls allowed, used, and allowed but never seen. A call never seen is
# not necessarily unneeded (an error path, a rare event): read the code before trimming.
# Needs strace on the host (it is shipped into the KVM sandbox). USAGE_TEST_ARGS adds
# arguments for the test harness, e.g. USAGE_TEST_ARGS="--skip ports_all" for guest_net
# (that test binds 131 070 sockets, each traced). Each binary's calls are also kept in
# target/seccomp-usage/BINARY.used.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

if (($# == 0)); then
    set -- $(cd tests/tests && ls guest_*.rs | sed 's/\.rs$//')
fi
cargo build --workspace --bins -q
out=$(mktemp -d /tmp/podvm-usage.XXXXXX)
trap 'rm -rf -- "$out"' EXIT
for test in "$@"; do
    echo "usage: running $test under strace" >&2
    PODVM_TEST_STRACE=/tmp/podvm-strace cargo test -q -p podvm-tests --test "$test" \
        -- --test-threads 2 ${USAGE_TEST_ARGS:-} >"$out/$test.log" 2>&1 ||
        echo "usage: $test had failures (strace slows podvm; its calls still count)" >&2
    grep -h '^strace-use ' "$out/$test.log" >>"$out/used" || true
    # Kept per binary, so runs of different binaries can be put together.
    mkdir -p target/seccomp-usage
    grep -h '^strace-use ' "$out/$test.log" | sort -u >"target/seccomp-usage/$test.used" || true
done
target/debug/podvm seccomp-profile --threads >"$out/allowed.json"
python3 - "$out/allowed.json" "$out/used" <<'PY'
import json, sys
allowed = json.load(open(sys.argv[1]))
used = {}
for line in open(sys.argv[2]):
    _, kind, call = line.split()
    used.setdefault(kind, set()).add(call)
print(f"{'thread':>10} {'allowed':>7} {'used':>5}  allowed, never seen")
for kind, calls in allowed.items():
    seen = used.get(kind, set())
    unused = sorted(set(calls) - seen)
    extra = sorted(seen - set(calls))
    print(f"{kind:>10} {len(calls):>7} {len(seen & set(calls)):>5}  {' '.join(unused)}")
    if extra:
        print(f"{'':>10} seen but not allowed (log mode?): {' '.join(extra)}")
PY

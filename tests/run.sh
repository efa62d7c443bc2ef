#!/usr/bin/env bash
# The test command (README, .ci/run): builds the test guest and podvm, then runs every test
# of the workspace. Guest-booting tests run directly on a hardware-KVM host; elsewhere cargo's
# runner (tests/sandbox/cargo-runner, set in .cargo/config.toml) runs them inside the KVM
# sandbox, which it builds on first use. Extra arguments go to `cargo test`.
#
# Every retry of every layer (the harness booting a guest again, the runner restarting a
# sandbox or running a failed test again) is recorded in target/test-retries.log and
# summarised at the end, with a FLAKY line for each test that passed only after a retry
# (tests/sandbox/README.md, "Retries"). PODVM_TEST_RETRIES=0 turns every retry off.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

mkdir -p target
export PODVM_TEST_RETRY_LOG=$PWD/target/test-retries.log
: >"$PODVM_TEST_RETRY_LOG"

tests/guest/build.sh
benches/guest/build.sh
# Integration tests start the podvm binary, which `cargo test` alone does not build.
cargo build --workspace --bins
# The container image (resources/image/build.sh: its static podvm, then the OCI layout):
# one guest test of each feature family runs its static podvm (tests/src/lib.rs,
# use_image_binary), and guest_image runs the image itself under crun. Without umoci only the
# binary is built (the same command), and guest_image skips (fails under PODVM_REQUIRE_KVM=1).
if command -v umoci >/dev/null; then
    resources/image/build.sh target/image
    export PODVM_IMAGE_OCI=$PWD/target/image/oci
else
    echo "tests/run.sh: umoci is missing (apt-get install umoci): no image for guest_image" >&2
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked -p launcher --target x86_64-unknown-linux-gnu
fi
export PODVM_IMAGE_BIN=$PWD/target/x86_64-unknown-linux-gnu/release/podvm
# --no-fail-fast: one run reports every failing test binary, not only the first.
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
# resources/: the image (built without a container engine), the manifests against the
# Kubernetes schemas and Pod Security "restricted", the seccomp profile against the lists.
tests/resources/run.sh || status=$?
tests/sandbox/retry-summary "$PODVM_TEST_RETRY_LOG" || echo "tests/run.sh: the retry summary failed" >&2
exit "$status"

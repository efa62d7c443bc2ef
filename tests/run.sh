#!/usr/bin/env bash
# The test command (README, .ci/run): builds the test guest and podvm, then runs every test
# of the workspace. Guest-booting tests run directly on a hardware-KVM host; elsewhere cargo's
# runner (tests/sandbox/cargo-runner, set in .cargo/config.toml) runs them inside the KVM
# sandbox, which it builds on first use. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

tests/guest/build.sh
benches/guest/build.sh
# Integration tests start the podvm binary, which `cargo test` alone does not build.
cargo build --workspace --bins
# --no-fail-fast: one run reports every failing test binary, not only the first.
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
# resources/: the image (built without a container engine), the manifests against the
# Kubernetes schemas and Pod Security "restricted", the seccomp profile against the lists.
tests/resources/run.sh || status=$?
exit "$status"

#!/usr/bin/env bash
# Live migration benchmark: podvm against QEMU's live migration of the same guest, side by
# side in one KVM sandbox run (this host's /dev/kvm is PVM; see tests/sandbox/README.md).
#
#   cargo build --release -p launcher && benches/migration/run.sh
#
# For each guest size (MIGBENCH_SIZES, MiB; default "256 1024") and load (MIGBENCH_LOADS:
# "idle", and "dirty": the guest rewrites 32 MiB of tmpfs ten times a second), a source
# and a destination VMM of each kind run in the sandbox, the guest boots and settles
# (MIGBENCH_SETTLE_S, default 20 s), then migrates over loopback TCP with a downtime target
# of MIGBENCH_DOWNTIME_MS (default 50) on both; MIGBENCH_ROUNDS (default 2) rounds, the
# even ones with QEMU first. Reported: total time and downtime as each VMM measures them
# (podvm: from the API call to the handover, and from the pause to the destination's
# go-ahead, with its phases; QEMU: `info migrate`'s "total time" and "downtime", which end
# when the source has sent everything). src_downtime_ms is the like-for-like figure: for
# podvm, from the pause until its last byte is sent. Output lines start with MIGBENCH; the
# whole run is kept in target/migration-bench/.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$here/../../tests/guest/lib.sh"
root=$PODVM_ROOT
out=$root/target/migration-bench
podvm=${MIGBENCH_PODVM:-$root/target/release/podvm}
guest_dir=$root/target/guest
mkdir -p -- "$out"
podvm_require_cmds qemu-system-x86_64 cargo

"$root/tests/guest/build.sh" "$guest_dir" >&2
if [[ -z ${MIGBENCH_PODVM:-} ]]; then
    (cd -- "$root" && cargo build --release -p launcher) >&2
fi
qemu=$(command -v qemu-system-x86_64)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=$out/sandbox-$stamp.log
podvm_log "running in the KVM sandbox; log: $log"
env_args=()
# PODVM_SECCOMP (kill, log, off) reaches podvm: the filters' cost can be compared.
for v in MIGBENCH_SIZES MIGBENCH_LOADS MIGBENCH_DOWNTIME_MS MIGBENCH_SETTLE_S MIGBENCH_ROUNDS \
    PODVM_SECCOMP; do
    [[ -n ${!v:-} ]] && env_args+=(--env "$v=${!v}")
done
"$root/tests/sandbox/run" --mem "${MIGBENCH_SANDBOX_MEM:-6144}" --cpus 2 \
    --file "$podvm" --file "$qemu" --file /usr/share/qemu --file /usr/share/seabios \
    --file "$guest_dir/vmlinuz" --file "$guest_dir/initramfs.cpio.gz" \
    --file "$here/in-sandbox.sh" \
    --env "MIGBENCH_PODVM=$podvm" --env "MIGBENCH_KERNEL=$guest_dir/vmlinuz" \
    --env "MIGBENCH_INITRD=$guest_dir/initramfs.cpio.gz" "${env_args[@]}" \
    -- "$here/in-sandbox.sh" 2>&1 | tee "$log" | grep '^MIGBENCH'
{
    echo "podvm=$podvm sha256=$(sha256sum <"$podvm" | cut -d' ' -f1)"
    echo "qemu=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo unknown)"
    echo "host load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$log"

#!/usr/bin/env bash
#
# tests/sandbox/build.sh [OUTDIR]
#
# Builds the KVM sandbox's base image from the same Debian cloud kernel as the
# test guest (tests/guest/lib.sh does the downloading and extracting; nothing
# is installed into the host and no root is needed):
#
#   OUTDIR/vmlinuz       the Debian cloud kernel (bzImage)
#   OUTDIR/base.cpio.gz  static busybox + /init + kvm, kvm-amd and friends
#   OUTDIR/VERSIONS      package versions used and sha256 of both outputs
#
# OUTDIR defaults to target/sandbox/ in the repository. Like the guest build
# it does nothing when the outputs are current. See tests/sandbox/README.md.
#
# Environment: PODVM_GUEST_KERNEL_PKG and PODVM_DEB_CACHE as for
# tests/guest/build.sh (the sandbox's kernel needs kvm-amd as a module).

set -euo pipefail

PODVM_LOG_TAG=sandbox-build
# shellcheck source=tests/guest/lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/../guest/lib.sh"

guest=$PODVM_ROOT/tests/guest
here=$PODVM_ROOT/tests/sandbox
outdir=${1:-$PODVM_ROOT/target/sandbox}
mkdir -p -- "$outdir"
outdir=$(cd -- "$outdir" && pwd)

# Loaded in this order (dependencies are added and ordered automatically);
# the ones this kernel lacks are skipped. kvm-amd is the point: QEMU's TCG
# "max" CPU emulates SVM, not VMX.
modules=(
    irqbypass kvm kvm_amd
    loop tun veth dummy
    vhost_iotlb vhost vhost_net
    virtio_ring virtio
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_mmio virtio_blk failover net_failover virtio_net
)

podvm_resolve_packages

inputs=$(podvm_inputs_hash \
    "kernel $KERNEL_PKG=$KERNEL_VER" \
    "kernel-deb ${KERNEL_DEB:+$(podvm_sha256 "$KERNEL_DEB")}" \
    "busybox $PODVM_BUSYBOX_PKG=$BUSYBOX_VER" \
    "modules ${modules[*]}" \
    "$here/build.sh" "$here/init.sh" "$guest/lib.sh" "$guest/modload.sh")

if podvm_outputs_current "$outdir/VERSIONS" "$inputs" \
    vmlinuz_sha256="$outdir/vmlinuz" base_cpio_sha256="$outdir/base.cpio.gz"; then
    [[ ${PODVM_BUILD_QUIET:-0} == 1 ]] || podvm_log "up to date: $outdir ($KERNEL_PKG $KERNEL_VER)"
    exit 0
fi

podvm_fetch_packages

stage=$(mktemp -d "${TMPDIR:-/tmp}/podvm-sandbox.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT

podvm_stage_base "$stage"
podvm_stage_modules "$stage" "${modules[@]}"
install -m 0755 -- "$here/init.sh" "$stage/init"
install -m 0644 -- "$guest/modload.sh" "$stage/lib/podvm/modload.sh"
mkdir -p -- "$stage/run" "$stage/podvm-sandbox" "$stage/usr/local/bin"
# Enough of /etc for programs that look up users, groups or hosts.
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$stage/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$stage/etc/group"
printf '127.0.0.1 localhost podvm-sandbox\n::1 localhost\n' >"$stage/etc/hosts"

rm -f -- "$outdir/VERSIONS"
podvm_mkcpio "$stage" "$outdir/base.cpio.gz"
cp -f -- "$VMLINUZ_SRC" "$outdir/vmlinuz.tmp"
mv -f -- "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"

podvm_write_versions "$outdir" tests/sandbox/build.sh "$inputs" \
    vmlinuz_sha256="$outdir/vmlinuz" base_cpio_sha256="$outdir/base.cpio.gz"
if [[ " ${PODVM_MODS_LOADED[*]} " != *" kvm_amd "* ]]; then
    podvm_log "warning: this kernel has no kvm-amd module; the sandbox will have no /dev/kvm"
fi

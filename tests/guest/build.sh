#!/usr/bin/env bash
#
# tests/guest/build.sh [OUTDIR]
#
# Builds the podvm test guest from Debian packages, without installing
# anything into the host and without root:
#
#   OUTDIR/vmlinuz            the Debian cloud kernel (bzImage)
#   OUTDIR/initramfs.cpio.gz  static busybox + /init + virtio/button modules +
#                             socat, iperf3 and dhcpcd with their libraries
#   OUTDIR/VERSIONS           package versions used and sha256 of both outputs
#
# OUTDIR defaults to target/guest/ in the repository. Packages are cached in
# target/debs/ (PODVM_DEB_CACHE). When the outputs exist and match the inputs
# recorded in VERSIONS (package versions, these scripts, the module and
# program lists), nothing is rebuilt. The contract of the image is in tests/guest/README.md.
#
# Environment:
#   PODVM_GUEST_KERNEL_PKG     kernel package (see podvm_resolve_kernel in
#                              lib.sh): metapackage, pkg, pkg=version or .deb
#   PODVM_GUEST_EXTRA_MODULES  more module names to include (space-separated)
#   PODVM_DEB_CACHE            package cache directory
#   PODVM_BUILD_QUIET          1: say nothing when the outputs are current

set -euo pipefail

PODVM_LOG_TAG=guest-build
# shellcheck source=tests/guest/lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

here=$PODVM_ROOT/tests/guest
outdir=${1:-$PODVM_ROOT/target/guest}
mkdir -p -- "$outdir"
outdir=$(cd -- "$outdir" && pwd)

# The modules the guest loads, by name. Dependencies are added and ordered
# automatically (virtio_ring before virtio, ...); ones built into the kernel or
# absent from it are skipped. "button" is the ACPI power button driver, "evdev"
# gives it the /dev/input node that acpid reads; "virtio_rng" is the entropy
# device (--rng; its dependency rng_core is built into Debian's kernel); vfat and
# its code pages mount the cloud-init NoCloud seed disk podvm writes for a VMI.
modules=(
    virtio_ring virtio
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_mmio
    virtio_blk
    failover net_failover virtio_net
    virtio_rng
    button
    evdev
    fat vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1
)
read -r -a extra <<<"${PODVM_GUEST_EXTRA_MODULES:-}"
modules+=("${extra[@]}")

# Dynamically linked programs from Debian, as PACKAGE:PATH-IN-PACKAGE. Their
# libraries and the loader come from Debian packages too (the ones the
# programs' ELF NEEDED entries lead to, found among each package's Depends;
# see podvm_resolve_programs in lib.sh), staged at their usual paths.
# socat: UDP echo server, TCP client and server for the network tests;
# iperf3: the network throughput benchmark; dhcpcd: a DHCPv6 client (busybox
# has none), without its hook scripts or dhcpcd.conf; see README.md for the
# command line; util-linux's blkdiscard: -z asks the disk to write zeroes
# (BLKZEROOUT; busybox's blkdiscard only discards).
programs=(
    socat:usr/bin/socat
    iperf3:usr/bin/iperf3
    dhcpcd-base:usr/sbin/dhcpcd
    util-linux:sbin/blkdiscard
)

podvm_resolve_packages
podvm_resolve_programs "${programs[@]}"

# Everything the outputs depend on; a change of any of it means a rebuild.
inputs=$(podvm_inputs_hash \
    "kernel $KERNEL_PKG=$KERNEL_VER" \
    "kernel-deb ${KERNEL_DEB:+$(podvm_sha256 "$KERNEL_DEB")}" \
    "busybox $PODVM_BUSYBOX_PKG=$BUSYBOX_VER" \
    "modules ${modules[*]}" \
    "programs ${programs[*]}" \
    "program-packages ${PODVM_PROG_PKGS[*]}" \
    "$here/build.sh" "$here/lib.sh" "$here/init.sh" "$here/modload.sh" \
    "$here/power-button.sh")

if podvm_outputs_current "$outdir/VERSIONS" "$inputs" \
    vmlinuz_sha256="$outdir/vmlinuz" initramfs_sha256="$outdir/initramfs.cpio.gz"; then
    [[ ${PODVM_BUILD_QUIET:-0} == 1 ]] || podvm_log "up to date: $outdir ($KERNEL_PKG $KERNEL_VER)"
    exit 0
fi

podvm_fetch_packages
podvm_fetch_programs

stage=$(mktemp -d "${TMPDIR:-/tmp}/podvm-guest.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT

podvm_stage_base "$stage"
podvm_stage_modules "$stage" "${modules[@]}"
program_paths=()
for p in "${programs[@]}"; do
    program_paths+=("${PODVM_PKG_TREE[${p%%:*}]}/${p#*:}")
done
podvm_stage_program "$stage" "${program_paths[@]}"
# Enough of /etc for programs that look up users, groups or hosts (glibc
# reads these directly; there is no nsswitch.conf, its defaults do).
# dhcpcd is built with privilege separation: its unprivileged processes run as
# the user dhcpcd, chrooted to its home, /usr/lib/dhcpcd (the user as the
# package's postinst adds it; without it dhcpcd says so and runs unseparated). It
# keeps its pid file in /run/dhcpcd and its DUID and leases in
# /var/lib/dhcpcd, and creates only the last component of those.
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
    'dhcpcd:x:100:65534:DHCP Client Daemon:/usr/lib/dhcpcd:/bin/false' \
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$stage/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$stage/etc/group"
mkdir -p -- "$stage/usr/lib/dhcpcd" "$stage/run" "$stage/var/lib"
printf '127.0.0.1 localhost podvm-guest\n::1 localhost\n' >"$stage/etc/hosts"
install -m 0755 -- "$here/init.sh" "$stage/init"
install -m 0644 -- "$here/modload.sh" "$stage/lib/podvm/modload.sh"
install -D -m 0755 -- "$here/power-button.sh" "$stage/etc/acpi/PWRF/00000080"

# Invalidate first, so an interrupted build is never taken as current.
rm -f -- "$outdir/VERSIONS"
podvm_mkcpio "$stage" "$outdir/initramfs.cpio.gz"
cp -f -- "$VMLINUZ_SRC" "$outdir/vmlinuz.tmp"
mv -f -- "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"

podvm_write_versions "$outdir" tests/guest/build.sh "$inputs" \
    vmlinuz_sha256="$outdir/vmlinuz" initramfs_sha256="$outdir/initramfs.cpio.gz"

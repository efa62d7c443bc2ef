#!/usr/bin/env bash
# The README's demo: builds podvm and the test guest, then runs the KubeVirt
# VirtualMachineInstance of resources/examples/demo-vmi.yaml (2 vCPUs, 512 MiB, a disk, the
# masquerade network, a console socket) and attaches this terminal to its console with
# `podvm console`, where the guest's busybox shell runs. `exit` or `poweroff -f` in the guest
# ends it; Ctrl-] detaches (podvm then runs on; `kill` it or attach again).
#
# On a host with hardware KVM podvm runs directly. Where /dev/kvm cannot run a stock kernel
# (PVM, as on the project's own machines) or is missing, it runs inside the KVM sandbox
# (QEMU TCG with emulated SVM; slow, but real KVM), and says so.
#
# Run as root on a fresh Debian 12 machine, it installs the Debian packages it needs first.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

need=(cpio gzip xz-utils)
hardware_kvm=false
if [[ -e /dev/kvm && ! -d /sys/module/kvm_pvm ]] &&
    [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then
    hardware_kvm=true
else
    need+=(qemu-system-x86)
fi
missing=()
for pkg in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if ((EUID == 0)); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "demo: missing Debian packages; install them with:" >&2
        echo "  sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

tests/guest/build.sh
cargo build --release -p launcher
podvm=$PWD/target/release/podvm
demo=$PWD/target/demo
# The VMI's kernelBoot paths (/usr/share/podvm/guest/..., where the demo image has the guest)
# are looked up under --kernel-boot-root; the PVC "demodisk" is a sparse file here.
rm -rf "$demo"
mkdir -p "$demo/root/usr/share/podvm/guest" "$demo/run"
cp target/guest/vmlinuz target/guest/initramfs.cpio.gz "$demo/root/usr/share/podvm/guest/"
# Runs podvm in the background (its log in run/podvm.log), then the console client.
cat >"$demo/start.sh" <<EOS
set -e
dd if=/dev/zero of=$demo/disk.img bs=1 count=0 seek=1073741824 2>/dev/null
$podvm run --vmi $PWD/resources/examples/demo-vmi.yaml --kernel-boot-root $demo/root \\
    --volume demodisk=$demo/disk.img --run-dir $demo/run 2>$demo/run/podvm.log &
while [ ! -S $demo/run/console.sock ]; do
    kill -0 \$! 2>/dev/null || { cat $demo/run/podvm.log; exit 1; }
    sleep 0.2
done
echo "demo: podvm runs the VMI (log: $demo/run/podvm.log); attaching to its console, Ctrl-] detaches"
$podvm console $demo/run/console.sock || true
wait
EOS

if $hardware_kvm; then
    exec sh "$demo/start.sh"
fi
echo "demo: this host's /dev/kvm cannot run a stock kernel; booting inside the KVM sandbox" >&2
exec tests/sandbox/run --interactive --file "$podvm" --file "$demo" --file "$PWD/resources/examples/demo-vmi.yaml" -- sh "$demo/start.sh"

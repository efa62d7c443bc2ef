#!/usr/bin/env bash
# The README's demo: builds podvm and the test guest, then boots the guest with an interactive
# shell on the console (2 vCPUs, 512 MiB). `exit` or `poweroff -f` in the guest ends it.
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
guest=$PWD/target/guest
args=(run --kernel "$guest/vmlinuz" --initrd "$guest/initramfs.cpio.gz" --cpus 2 --memory 512)

if $hardware_kvm; then
    exec "$podvm" "${args[@]}"
fi
echo "demo: this host's /dev/kvm cannot run a stock kernel; booting inside the KVM sandbox" >&2
exec tests/sandbox/run --interactive --file "$podvm" --file "$guest" -- "$podvm" "${args[@]}"

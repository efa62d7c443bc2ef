#!/bin/sh
# shellcheck shell=sh
#
# /init of the KVM sandbox (busybox sh; installed as /init in base.cpio.gz by
# tests/sandbox/build.sh). The sandbox is a QEMU TCG machine whose emulated
# CPU has SVM, so after loading kvm-amd it has a /dev/kvm with hardware
# semantics; see tests/sandbox/README.md.
#
# tests/sandbox/run appends a second cpio archive holding the files to ship
# and /podvm-sandbox/cmd.sh, the command to run. This script:
#   - mounts proc, sysfs, devtmpfs, devpts, tmpfs on /tmp, /run, /dev/shm;
#   - loads irqbypass, kvm, kvm-amd, loop, tun, veth, dummy, vhost-net and the
#     virtio modules (the list in /etc/podvm/modules, failures ignored);
#   - brings up lo;
#   - non-interactive: prints SANDBOX-START, runs cmd.sh with stdin from
#     /dev/null and output on the console, prints SANDBOX-EXIT <status>;
#   - interactive (/podvm-sandbox/interactive exists): runs cmd.sh with the
#     console as controlling terminal and writes SANDBOX-EXIT <status> to the
#     second serial port (ttyS1), which run reads from a file;
#   - without cmd.sh: an interactive shell;
#   - powers off.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
# A tmpfs on /tmp, unless the payload shipped files under /tmp: mounting over
# them would hide them. The root file system is a tmpfs anyway.
if [ -n "$(ls -A /tmp 2>/dev/null)" ]; then
    chmod 1777 /tmp
else
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
fi
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup 2>/dev/null || :
hostname podvm-sandbox

# shellcheck source=tests/guest/modload.sh
. /lib/podvm/modload.sh
podvm_load_modules /etc/podvm/modules
# Open to every user, as distributions' udev rules make them and a KVM device plugin hands
# them to a pod: the guest tests run podvm as a pod's user (tests/src/pod.rs).
chmod 0666 /dev/kvm /dev/vhost-net /dev/net/tun 2>/dev/null || :
ip link set lo up 2>/dev/null || podvm_kmsg "cannot bring up lo"

cmd=/podvm-sandbox/cmd.sh
if [ -f "$cmd" ] && [ -e /podvm-sandbox/interactive ]; then
    # setsid + cttyhack: the console becomes the controlling terminal, so
    # job control and ^C work for the command.
    setsid cttyhack sh "$cmd"
    status=$?
    echo "SANDBOX-EXIT $status" >/dev/ttyS1 2>/dev/null ||
        echo "SANDBOX-EXIT $status"
elif [ -f "$cmd" ]; then
    # run shows only what follows this line.
    echo "SANDBOX-START"
    sh "$cmd" </dev/null
    status=$?
    # No leading newline: run strips the marker from the end of whatever
    # line it ends, so output without a final newline comes through intact.
    echo "SANDBOX-EXIT $status"
else
    echo "sandbox: no /podvm-sandbox/cmd.sh; starting a shell (exit powers off)"
    setsid cttyhack sh
fi

sync
poweroff -f

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

# podvm_watchdog LIMIT: the sandbox's own view of itself, for when its console goes quiet
# (the host sees only silence). Every 30 s one line: uptime, the console's transmit count
# (ttyS0's "tx:" in /proc/tty/driver/serial) and the load. When that count has not moved for
# LIMIT seconds (run passes half its silence limit; the tests print a heartbeat at least
# every quarter of it), and every 300 s after: every task's state, wait channel and kernel
# stack, the blocked tasks and CPU backtraces (sysrq w and l) and the kernel log's end. run
# sends this to the second serial port (ttyS1), keeps it in a file and prints it when the
# sandbox fails.
podvm_watchdog() {
    _wd_limit=$1 _wd_last='' _wd_still=0 _wd_next=$1
    while sleep 30; do
        _wd_tx=$(sed -n 's/^0: .* tx:\([0-9]*\).*/\1/p' /proc/tty/driver/serial 2>/dev/null)
        if [ "$_wd_tx" = "$_wd_last" ]; then
            _wd_still=$((_wd_still + 30))
        else
            _wd_still=0 _wd_next=$_wd_limit _wd_last=$_wd_tx
        fi
        echo "watchdog: up $(cut -d ' ' -f 1 /proc/uptime) s; console tx ${_wd_tx:-?}," \
            "unchanged for $_wd_still s; load $(cut -d ' ' -f 1-4 /proc/loadavg)"
        [ "$_wd_still" -ge "$_wd_next" ] || continue
        _wd_next=$((_wd_still + 300))
        echo "watchdog: === the console has been quiet for $_wd_still s: the sandbox's state ==="
        cat /proc/tty/driver/serial
        for _wd_t in /proc/[0-9]*/task/[0-9]*; do
            read -r _wd_stat <"$_wd_t/stat" 2>/dev/null || continue
            # Not the kernel's own threads (kthreadd's children): sysrq w shows those blocked.
            # shellcheck disable=SC2086 # split into its fields
            set -- ${_wd_stat##*) }
            if [ "${2:-}" = 2 ] || [ "${_wd_t#/proc/}" = 2/task/2 ]; then continue; fi
            echo "--- task ${_wd_t#/proc/}: $_wd_stat" | cut -c 1-160
            echo "    wchan $(cat "$_wd_t/wchan" 2>/dev/null)"
            sed 's/^/    /' "$_wd_t/stack" 2>/dev/null
        done
        echo w >/proc/sysrq-trigger 2>/dev/null
        echo l >/proc/sysrq-trigger 2>/dev/null
        sleep 1
        echo "watchdog: --- the kernel log's last 300 lines"
        dmesg | tail -n 300
        echo "watchdog: === end of state ==="
    done
}

cmd=/podvm-sandbox/cmd.sh
if [ -f "$cmd" ] && [ -e /podvm-sandbox/interactive ]; then
    # setsid + cttyhack: the console becomes the controlling terminal, so
    # job control and ^C work for the command.
    setsid cttyhack sh "$cmd"
    status=$?
    echo "SANDBOX-EXIT $status" >/dev/ttyS1 2>/dev/null ||
        echo "SANDBOX-EXIT $status"
elif [ -f "$cmd" ]; then
    if [ -f /podvm-sandbox/watchdog ]; then
        podvm_watchdog "$(cat /podvm-sandbox/watchdog)" >/dev/ttyS1 2>&1 &
        watchdog=$!
    fi
    # run shows only what follows this line.
    echo "SANDBOX-START"
    sh "$cmd" </dev/null
    status=$?
    # No leading newline: run strips the marker from the end of whatever
    # line it ends, so output without a final newline comes through intact.
    [ -z "${watchdog:-}" ] || kill "$watchdog" 2>/dev/null
    echo "SANDBOX-EXIT $status"
else
    echo "sandbox: no /podvm-sandbox/cmd.sh; starting a shell (exit powers off)"
    setsid cttyhack sh
fi

sync
poweroff -f

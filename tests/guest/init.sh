#!/bin/sh
# shellcheck shell=sh
#
# /init of the podvm test guest (busybox sh; installed as /init by
# tests/guest/build.sh). The contract is described in tests/guest/README.md:
#
#   - mounts proc, sysfs, devtmpfs (/dev), devpts and a tmpfs on /tmp;
#   - loads the virtio and ACPI button modules listed in /etc/podvm/modules;
#   - with podvm.exec=<base64 of a sh script> on the kernel command line:
#     runs that script under `set -eu` (a failing command ends it; its status,
#     line and text are printed), prints "PODVM-EXIT <status>" on a line of its
#     own and powers off;
#   - without it: the first NIC (eth0) configured by DHCP, as a cloud image
#     would, then an interactive shell on the console, power-off on its exit.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
hostname podvm-guest

# shellcheck source=tests/guest/modload.sh
. /lib/podvm/modload.sh
podvm_load_modules /etc/podvm/modules

# The ACPI power button (podvm's graceful shutdown, SIGTERM to podvm) runs
# /etc/acpi/PWRF/00000080, which syncs and powers off.
# acpid needs /var/run for its pid file, or it exits at once.
mkdir -p /var/run /var/log
acpid -c /etc/acpi -l /var/log/acpid.log 2>/dev/null ||
    echo "podvm-init: acpid did not start" >&2

# For the interactive shell: lo up and, if the VM has a NIC, eth0 configured
# by DHCP (busybox udhcpc: address, router, MTU, name servers), as a cloud
# image's network set-up would; IPv6 needs nothing (the kernel takes the
# router's advertisements). udhcpc stays in the background to renew the lease;
# without an answer in 3 s it goes on trying there.
net_up() {
    ip link set lo up
    [ -e /sys/class/net/eth0 ] || return 0
    ip link set eth0 up
    cat >/tmp/udhcpc.sh <<'EOS'
#!/bin/sh
case "$1" in
deconfig) ip -4 addr flush dev "$interface" ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; done
    {
        [ -n "$search" ] && echo "search $search"
        for d in $dns; do echo "nameserver $d"; done
    } >/etc/resolv.conf
    echo "podvm-init: $interface: $ip/$mask, gateway ${router:-none}, MTU ${mtu:-1500}, DNS ${dns:-none} (DHCP)" >/dev/console
    ;;
esac
EOS
    chmod +x /tmp/udhcpc.sh
    udhcpc -i eth0 -b -t 3 -T 1 -s /tmp/udhcpc.sh >/dev/null 2>&1 ||
        echo "podvm-init: eth0: udhcpc did not start" >&2
}

# The script to run: the value of podvm.exec= (standard base64 alphabet, '='
# padding allowed; the kernel keeps dotted parameters out of init's argv and
# environment but leaves them in /proc/cmdline).
exec_b64=
set -f
# shellcheck disable=SC2013 # words, not lines, are wanted
for word in $(cat /proc/cmdline); do
    case $word in podvm.exec=*) exec_b64=${word#podvm.exec=} ;; esac
done
set +f

# The script runs in a shell of its own under `set -eu`: the first command that fails (or an
# unset variable) ends it with that command's status, so its status is never that of a last
# `echo` after a failure. On a non-zero exit the EXIT trap prints the status, the line and
# its text. $LINENO there is the line of the last command the script's shell ran itself: a
# failed simple command's own line, a subshell's first line; for a pipeline (run by child
# processes) the line of the command before it.
write_exec_runner() {
    cat >/tmp/podvm-run.sh <<'EOS'
set -eu
trap 'podvm_status=$? podvm_line=$LINENO
if [ "$podvm_status" -ne 0 ]; then
    printf "\npodvm-init: the script exited with status %d at line %d: %s\n" \
        "$podvm_status" "$podvm_line" "$(sed -n "${podvm_line}p" /tmp/podvm-exec.sh)" >&2
fi' EXIT
. /tmp/podvm-exec.sh
EOS
}

if [ -n "$exec_b64" ]; then
    if printf '%s' "$exec_b64" | base64 -d >/tmp/podvm-exec.sh 2>/dev/null; then
        write_exec_runner
        sh /tmp/podvm-run.sh
        status=$?
    else
        echo "podvm-init: podvm.exec= is not valid base64" >&2
        status=126
    fi
    # The leading newline makes sure the marker starts a line even when the
    # script's output did not end with one.
    printf '\nPODVM-EXIT %d\n' "$status"
else
    net_up
    echo "podvm-init: no podvm.exec= on the kernel command line; starting a shell (exit powers off)"
    # setsid + cttyhack give the shell the console as controlling terminal,
    # so job control and ^C work.
    setsid cttyhack sh
fi

sync
poweroff -f

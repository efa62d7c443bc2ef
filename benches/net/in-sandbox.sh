#!/bin/sh
# shellcheck shell=sh
#
# benches/net/in-sandbox.sh: the part of the network benchmark that runs
# inside the KVM sandbox (busybox sh, as root). Started by benches/net/run.sh,
# which ships the files named below and passes the settings as NETBENCH_*
# environment variables. The sandbox plays the pod.
#
# 1. Unpacks iperf3 (the guest's own binary and libraries) and connrate
#    (NETBENCH_CPIO) at /opt/netbench.
# 2. Sets up the pod side:
#      - a dummy interface nb0, 192.168.100.2/24, default route via
#        192.168.100.1: the sandbox has no network (only lo); passt needs an
#        interface with a default route to copy into its guest, and podvm's
#        user backend connects to its address for the guest's gateway (the
#        pod's own address, as in KubeVirt);
#      - a tap, tap0 (vnet_hdr), 10.10.0.1/24, up: for podvm's tap backend
#        and QEMU's, one after the other;
#      - connrate server on port 5300 (all addresses), for the whole run;
#      - iperf3 -s on port 5201 (all addresses), restarted for every run.
# 3. Runs each configuration of NETBENCH_CONFIGS, one after the other, in
#    NETBENCH_ROUNDS rounds (every other one in reverse order; a run whose
#    guest dies is run once more), same
#    guest kernel, initramfs, memory and vCPUs; the guest runs guest.sh
#    against the pod-side address of that configuration:
#      podvm-user       podvm --net user                 10.0.2.1 (the pod's address, nb0)
#      podvm-user-1500  podvm --net user,mtu=1500        10.0.2.1
#      podvm-user-b     podvm --net user, but the binary NETBENCH_PODVM_B
#                       (another build, for an A/B comparison)  10.0.2.1
#      qemu-slirp       -netdev user                     10.0.2.2 (the host's loopback)
#      qemu-passt       passt, -netdev stream            192.168.100.1 (gateway, mapped to loopback)
#      podvm-tap        podvm --net tap=tap0,vhost=off   10.10.0.1 (the tap's address)
#      qemu-tap         -netdev tap,ifname=tap0,vhost=off 10.10.0.1
#      podvm-tap-vhost  podvm --net tap=tap0,vhost=on    10.10.0.1
#      qemu-tap-vhost   -netdev tap,ifname=tap0,vhost=on  10.10.0.1
# 4. Passes the guest's marked lines (NETBENCH-*) on to its stdout, plus one
#    NETBENCH-RUN line per run, the VMM's stderr (NETBENCH-VMMLOG), passt's
#    log (NETBENCH-PASSTLOG) and, for podvm, its counters once the guest has
#    finished (`podvm api SOCKET counters`, NETBENCH-COUNTERS). A run whose
#    console stays silent for NETBENCH_STALL_TIMEOUT s, or that lasts
#    NETBENCH_VM_TIMEOUT s, is stopped; first its threads are described
#    (NETBENCH-HANG: state, CPU, wait channel, and with NETBENCH_GDB a
#    backtrace of every thread) and podvm's counters are asked for. The whole
#    console log of each guest stays in /netbench/logs.

set -u

: "${NETBENCH_CPIO:?}" "${NETBENCH_KERNEL:?}" "${NETBENCH_INITRD:?}" "${NETBENCH_PODVM:?}"
qemu=${NETBENCH_QEMU:-/usr/bin/qemu-system-x86_64}
passt=${NETBENCH_PASST:-}
ip=${NETBENCH_IP:-/usr/sbin/ip}
secs=${NETBENCH_SECONDS:-10}
conn_secs=${NETBENCH_CONN_SECONDS:-10}
guest_mem=${NETBENCH_GUEST_MEM:-512}
guest_cpus=${NETBENCH_GUEST_CPUS:-1}
configs=${NETBENCH_CONFIGS:-podvm-user qemu-slirp qemu-passt podvm-user-1500 podvm-tap qemu-tap podvm-tap-vhost qemu-tap-vhost}
# A run takes about a minute here; a hung guest must not eat the time budget.
# The guest prints something at least every iperf3 run (11 s) or connrate run,
# and boots (quietly) in 15-30 s.
vm_timeout=${NETBENCH_VM_TIMEOUT:-180}
stall_timeout=${NETBENCH_STALL_TIMEOUT:-60}
gdb=${NETBENCH_GDB:-}
rounds=${NETBENCH_ROUNDS:-2}
cmdline_base=${NETBENCH_CMDLINE:-console=ttyS0 reboot=k panic=1 pci=off quiet}

say() { echo "NETBENCH-LOG $*"; }
die() {
    echo "NETBENCH-FATAL $*"
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_all=$(now)
say "sandbox: $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB," \
    "kernel $(uname -r)"

# --- programs ----------------------------------------------------------------

(cd / && cpio -idm <"$NETBENCH_CPIO") 2>/dev/null || die "cannot unpack $NETBENCH_CPIO"
root=/opt/netbench/root
# iperf3 through the guest's own loader and libraries. It replaces the calling
# shell (exec): call it in a subshell, so that $! is iperf3 itself.
exec_iperf3() {
    exec "$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \
        "$root/usr/bin/iperf3" "$@"
}
connrate=/opt/netbench/bin/connrate
say "pod side: iperf3 $( (exec_iperf3 --version) | head -n 1 | awk '{ print $2 }'), passt ${passt:-none}"

# --- the pod's network ---------------------------------------------------------

mkdir -p /netbench/logs /netbench/passt-root
# passt drops to nobody before it binds its socket.
mkdir -m 1777 /netbench/sock
"$ip" link add nb0 type dummy || die "cannot add the dummy interface"
"$ip" addr add 192.168.100.2/24 dev nb0
"$ip" link set nb0 up
"$ip" route add default via 192.168.100.1 dev nb0 || die "cannot add the default route"
"$ip" tuntap add dev tap0 mode tap vnet_hdr || die "cannot create tap0"
"$ip" addr add 10.10.0.1/24 dev tap0
"$ip" link set tap0 up
say "pod addresses: $("$ip" -4 -o addr show | awk '{ printf "%s %s; ", $2, $4 }')" \
    "vhost-net: $([ -c /dev/vhost-net ] && echo yes || echo no)"

"$connrate" server 5300 >/netbench/logs/connrate-server.log 2>&1 &
connrate_pid=$!

iperf_pid=
start_iperf() {
    [ -n "$iperf_pid" ] && kill "$iperf_pid" 2>/dev/null && wait "$iperf_pid" 2>/dev/null
    (exec_iperf3 -s -p 5201) >"$1.iperf3-server" 2>&1 &
    iperf_pid=$!
}

# --- the runs ----------------------------------------------------------------

guest_cmdline() { # LABEL NET SERVER
    script="sh /opt/netbench/guest.sh $1 $2 $3 $secs $conn_secs"
    echo "$cmdline_base podvm.exec=$(printf '%s' "$script" | base64 | tr -d '\n')"
}

# Both run in the background subshell of the loop below and replace it (exec),
# so that its process ID is the VMM's. QEMU logs CPU resets (a guest that
# triple-faults ends QEMU silently with -no-reboot) and guest errors to
# $f.qemu-d.
qemu_vm() { # LABEL NET SERVER NETDEV
    exec "$qemu" -M microvm,pit=on,rtc=on -accel kvm -cpu host \
        -d cpu_reset,guest_errors -D "$f.qemu-d" \
        -m "$guest_mem" -smp "$guest_cpus" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$NETBENCH_KERNEL" -initrd "$NETBENCH_INITRD" \
        -append "$(guest_cmdline "$1" "$2" "$3")" \
        -global virtio-mmio.force-legacy=false \
        -netdev "$4" -device virtio-net-device,netdev=n0
}

podvm_vm() { # LABEL NET SERVER NETSPEC [MORE PODVM ARGS]
    vm_cmdline=$(guest_cmdline "$1" "$2" "$3")
    vm_label=$1
    vm_net=$4
    shift 4
    exec "$(podvm_binary "$vm_label")" run --kernel "$NETBENCH_KERNEL" --initrd "$NETBENCH_INITRD" \
        --cmdline "$vm_cmdline" --cpus "$guest_cpus" --memory "$guest_mem" --net "$vm_net" \
        --api-socket /netbench/podvm-api.sock "$@"
}

# The podvm binary a configuration runs.
podvm_binary() { # LABEL
    case $1 in
        podvm-user-b) echo "${NETBENCH_PODVM_B:?podvm-user-b needs NETBENCH_PODVM_B}" ;;
        *) echo "$NETBENCH_PODVM" ;;
    esac
}

counters() { # LABEL WHEN
    "$(podvm_binary "$1")" api /netbench/podvm-api.sock counters 2>&1 | tr -d '\n' | tr -s ' ' |
        sed "s/^/NETBENCH-COUNTERS $1 $2 /"
    echo
}

passt_pid=
# passt sandboxes itself: among other things it pivot_root()s into an empty
# tmpfs, which Linux refuses while the root is the initramfs (rootfs), as the
# sandbox's is. So it starts in a mount namespace of its own whose root is a
# bind mount of the sandbox's root moved over / (what switch_root does; not a
# chroot, which would forbid the user namespace passt also makes): same
# files, same network namespace. unshare, sh and chroot all exec, so $! is
# passt.
start_passt() { # LOGPREFIX
    rm -f /netbench/sock/passt.sock
    # As root passt would switch to "nobody"; say so by number (the sandbox
    # has no /etc/passwd). Stopped after the run.
    # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
    unshare -m sh -c 'mount -o rbind / /netbench/passt-root && cd /netbench/passt-root &&
        mount -o move . / && exec chroot . "$0" "$@"' \
        "$passt" -f --runas 65534:65534 -s /netbench/sock/passt.sock \
        >"$1.passt" 2>&1 &
    passt_pid=$!
    i=0
    while [ ! -S /netbench/sock/passt.sock ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -S /netbench/sock/passt.sock ] || echo "NETBENCH-ERROR qemu-passt passt made no socket"
}

# hang_report LABEL PID: what each thread of a VMM that overran its time is
# doing, sampled twice 2 s apart (state, CPU ticks used, kernel wait channel,
# current system call number).
hang_report() {
    for round in 1 2; do
        for task in /proc/"$2"/task/*; do
            st=$(sed 's/^.*) //' "$task/stat")
            echo "NETBENCH-HANG $1 sample=$round tid=${task##*/} comm=$(cat "$task/comm")" \
                "state=$(echo "$st" | awk '{ print $1 }')" \
                "cpu_ticks=$(echo "$st" | awk '{ print $12 + $13 }')" \
                "wchan=$(cat "$task/wchan" 2>/dev/null)" \
                "syscall=$(cut -d' ' -f1 "$task/syscall" 2>/dev/null)"
        done
        [ $round = 1 ] && sleep 2
    done
    if [ -n "$gdb" ]; then
        "$gdb" -nx -batch -p "$2" -ex 'thread apply all bt 25' >/netbench/logs/gdb.out 2>&1
        if grep -qE '^(Thread|#)' /netbench/logs/gdb.out; then
            grep -E '^(Thread|#)' /netbench/logs/gdb.out
        else
            tail -n 5 /netbench/logs/gdb.out
        fi | sed "s/^/NETBENCH-HANG $1 gdb: /"
    fi
}

# run_config CONFIG ROUND ATTEMPT: one VM of one configuration, watched,
# reported. Returns 1 when the guest died (the VMM ended without the guest's
# PODVM-EXIT, and not because it was stopped here) in a first attempt: its
# results are then reported as NETBENCH-PARTIAL and the caller runs it again.
run_config() {
    c=$1
    r=$2
    attempt=$3
    f=/netbench/logs/$c-r$r-a$attempt
    log=$f.log
    err=$f.err
    : >"$log"
    : >"$err"
    start_iperf "$f"
    rm -f /netbench/podvm-api.sock
    say "$c (round $r, attempt $attempt): start"
    t=$(now)
    case $c in
        qemu-passt) start_passt "$f" ;;
    esac
    case $c in
        podvm-user) podvm_vm "$c" dhcp 10.0.2.1 user ;;
        podvm-user-1500) podvm_vm "$c" dhcp 10.0.2.1 user,mtu=1500 ;;
        podvm-user-noseccomp) podvm_vm "$c" dhcp 10.0.2.1 user --seccomp off ;;
        podvm-user-b) podvm_vm "$c" dhcp 10.0.2.1 user ;;
        podvm-tap) podvm_vm "$c" static:10.10.0.2/24:10.10.0.1 10.10.0.1 tap=tap0,vhost=off ;;
        podvm-tap-vhost) podvm_vm "$c" static:10.10.0.2/24:10.10.0.1 10.10.0.1 tap=tap0,vhost=on ;;
        qemu-slirp) qemu_vm "$c" dhcp 10.0.2.2 user,id=n0 ;;
        qemu-passt)
            qemu_vm "$c" dhcp 192.168.100.1 \
                stream,id=n0,server=off,addr.type=unix,addr.path=/netbench/sock/passt.sock
            ;;
        qemu-tap)
            qemu_vm "$c" static:10.10.0.2/24:10.10.0.1 10.10.0.1 \
                tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off
            ;;
        qemu-tap-vhost)
            qemu_vm "$c" static:10.10.0.2/24:10.10.0.1 10.10.0.1 \
                tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on
            ;;
        *) die "unknown configuration $c" ;;
    esac </dev/null >"$log" 2>"$err" &
    vm=$!
    # Watch the run: read podvm's counters when the guest is done (it then
    # sleeps 2 s), and stop a run that takes too long.
    got_counters=0
    timed_out=0
    size=0
    t_out=$(now)
    while kill -0 "$vm" 2>/dev/null; do
        # Console output since the last look?
        s=$(wc -c <"$log")
        if [ "$s" != "$size" ]; then
            size=$s
            t_out=$(now)
        fi
        if [ "$c" != "${c#podvm}" ] && [ $got_counters = 0 ] &&
            grep -q NETBENCH-GUEST-DONE "$log"; then
            counters "$c" end >"$f.counters"
            got_counters=1
        fi
        if [ "$(elapsed "$t" | cut -d. -f1)" -ge "$vm_timeout" ] ||
            [ "$(elapsed "$t_out" | cut -d. -f1)" -ge "$stall_timeout" ]; then
            timed_out=1
            echo "NETBENCH-ERROR $c stopped: $(elapsed "$t") s since start," \
                "$(elapsed "$t_out") s without console output" >"$f.stopped"
            hang_report "$c" "$vm" >"$f.hang"
            [ "$c" != "${c#podvm}" ] && counters "$c" timeout >"$f.counters"
            kill "$vm" 2>/dev/null
            sleep 3
            kill -9 "$vm" 2>/dev/null
            break
        fi
        sleep 1
    done
    wait "$vm"
    rc=$?
    wall=$(elapsed "$t")
    if [ -n "$passt_pid" ]; then
        kill "$passt_pid" 2>/dev/null
        wait "$passt_pid" 2>/dev/null
        passt_pid=
    fi
    guest_exit=$(tr -d '\r' <"$log" | sed -n 's/^PODVM-EXIT \([0-9]*\)$/\1/p' | tail -n 1)
    retry=0
    [ -z "$guest_exit" ] && [ $timed_out = 0 ] && [ "$attempt" = 1 ] && retry=1
    # The guest's marked lines (a marker can follow other output on a line;
    # the console adds \r).
    tr -d '\r' <"$log" | grep -a 'NETBENCH-' | sed 's/^.*\(NETBENCH-[A-Z-]*\)/\1/' |
        if [ $retry = 1 ]; then sed 's/^NETBENCH-RESULT /NETBENCH-PARTIAL /'; else cat; fi
    echo "NETBENCH-RUN $c round=$r attempt=$attempt status=$rc guest_exit=${guest_exit:--}" \
        "wall_s=$wall timed_out=$timed_out retrying=$retry"
    if [ -z "$guest_exit" ] || [ $timed_out = 1 ]; then
        [ -s "$f.stopped" ] && cat "$f.stopped"
        echo "NETBENCH-ERROR $c the guest did not finish (${wall} s; limits: ${vm_timeout} s," \
            "${stall_timeout} s silent); last console lines follow"
        tr -d '\r' <"$log" | tail -n 25 | sed "s/^/NETBENCH-TAIL $c /"
        [ -s "$f.qemu-d" ] && grep -aE 'CPU Reset|^[A-Za-z]' "$f.qemu-d" | tail -n 10 |
            sed "s/^/NETBENCH-QEMULOG $c /"
    fi
    [ -s "$f.hang" ] && cat "$f.hang"
    [ -s "$f.counters" ] && cat "$f.counters"
    [ -s "$err" ] && head -n 30 "$err" | sed "s/^/NETBENCH-VMMLOG $c /"
    [ -s "$f.passt" ] && grep -v 'to syslog' "$f.passt" | head -n 30 |
        sed "s/^/NETBENCH-PASSTLOG $c /"
    grep -iE 'error|fail|unable|denied' "$f.iperf3-server" | head -n 5 |
        sed "s/^/NETBENCH-IPERFSERVER $c /"
    [ $retry = 0 ]
}

round_no=1
while [ "$round_no" -le "$rounds" ]; do
    order=$configs
    # Every other round in reverse order, so that a drift of the host's load
    # over the run does not favour the configurations that come first.
    [ $((round_no % 2)) = 0 ] &&
        order=$(echo "$configs" | awk '{ for (i = NF; i > 0; i--) print $i }')
    for config in $order; do
        run_config "$config" "$round_no" 1 || run_config "$config" "$round_no" 2
    done
    round_no=$((round_no + 1))
done

kill "$iperf_pid" "$connrate_pid" 2>/dev/null
dmesg | grep -iE 'error|fail|warn|timed out|unhandled|tap0|vhost' | head -n 20 |
    sed 's/^/NETBENCH-SANDBOX-DMESG /'
say "all done in $(elapsed "$t_all") s"

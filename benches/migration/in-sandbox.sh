#!/bin/sh
# Runs inside the KVM sandbox (see run.sh): for each guest size and load, migrates the
# same guest once with podvm (source and destination podvm on a unix socket) and once
# with QEMU (-incoming tcp:127.0.0.1:PORT, migrate on the monitor), both over loopback TCP, and prints one line per run:
#   MIGBENCH vmm=podvm|qemu mem=MIB load=idle|dirty total_ms=.. downtime_ms=.. status=..
set -u
podvm=$MIGBENCH_PODVM
kernel=$MIGBENCH_KERNEL
initrd=$MIGBENCH_INITRD
sizes=${MIGBENCH_SIZES:-256 1024}
loads=${MIGBENCH_LOADS:-idle dirty}
downtime_ms=${MIGBENCH_DOWNTIME_MS:-50}
qemu=$(command -v qemu-system-x86_64)
work=/tmp/migbench
mkdir -p "$work"
# Every migration gets a fresh loopback port (no TIME-WAIT leftovers in the way).
port=47000

# The guest: idle waits; dirty rewrites 32 MiB of tmpfs ten times a second (about
# 320 MiB/s when the vCPU keeps up), which both VMMs must chase.
script_for() {
    case $1 in
    idle) echo 'echo MIGBENCH-GUEST-UP; while true; do sleep 1; done' ;;
    dirty) echo 'echo MIGBENCH-GUEST-UP; mkdir -p /mnt; mount -t tmpfs -o size=64m tmpfs /mnt; while true; do dd if=/dev/zero of=/mnt/f bs=1M count=32 conv=notrunc 2>/dev/null; sleep 0.1; done' ;;
    esac
}
cmdline_for() {
    printf 'console=ttyS0 reboot=k panic=1 pci=off quiet podvm.exec=%s' \
        "$(script_for "$1" | base64 | tr -d '\n')"
}

wait_for() { # FILE PATTERN SECONDS
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt $(($3 * 10)) ] && return 1
        sleep 0.1
    done
}

json_num() { # KEY < json
    sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" | head -n1
}

run_podvm() { # MIB LOAD
    port=$((port + 1))
    rm -rf "$work/p" && mkdir -p "$work/p"
    d=$work/p
    common="--kernel $kernel --initrd $initrd --memory $1 --migration-insecure --migration-downtime-ms $downtime_ms"
    # shellcheck disable=SC2086
    "$podvm" run $common --cmdline "$(cmdline_for "$2")" --console off \
        --api-socket "$d/src.api" >"$d/src.out" 2>&1 &
    src=$!
    "$podvm" run $common --cmdline "$(cmdline_for "$2")" --console off \
        --api-socket "$d/dst.api" --incoming "tcp:127.0.0.1:$port" >"$d/dst.out" 2>&1 &
    dst=$!
    wait_for "$d/src.out" 'guest started' 60 || true
    # The guest's script announces itself on the console; podvm logs nothing more, so
    # give the guest time to boot and (dirty) start its loop.
    sleep "${MIGBENCH_SETTLE_S:-20}"
    "$podvm" api "$d/src.api" migrate "tcp:127.0.0.1:$port" >/dev/null
    status=timeout
    i=0
    while [ $i -lt 6000 ]; do
        s=$("$podvm" api "$d/src.api" migration 2>/dev/null) || { status=ended; break; }
        case $s in
        *'"failed"'*) status=failed; break ;;
        esac
        last=$s
        i=$((i + 1))
        sleep 0.1
    done
    wait $src
    rc=$?
    if grep -q '^migrated' "$d/src.out"; then status=completed; fi
    line=$(grep 'INFO migrated' "$d/src.out" | tail -n1)
    total=$(echo "$line" | sed -n 's/.*total_ms=\([0-9.]*\).*/\1/p')
    down=$(echo "$line" | sed -n 's/.*downtime_ms=\([0-9.]*\).*/\1/p')
    rounds=$(echo "$line" | sed -n 's/.* rounds=\([0-9]*\).*/\1/p')
    # The part QEMU's figure covers: from the pause until the last byte is sent (QEMU
    # does not wait for its destination to load the state).
    src_down=$(echo "$line" | sed -n 's/.*phases=pause \([0-9.]*\) + disks \([0-9.]*\) + harvest \([0-9.]*\) + save \([0-9.]*\) + send \([0-9.]*\) + .*/\1 \2 \3 \4 \5/p' |
        awk '{ printf "%.1f", $1 + $2 + $3 + $4 + $5 }')
    phases=$(echo "$line" | sed -n 's/.*phases=\(.*\)$/\1/p' | tr -d ' ')
    # Of the destination phase: the destination's own restore (after the last byte came).
    dst_line=$(grep 'migration received and restored' "$d/dst.out" | tail -n1)
    dst_field() { echo "$dst_line" | grep -o "$1=[0-9.]*" | cut -d= -f2; }
    phases="$phases(lastpass$(dst_field last_pass_ms)+parse$(dst_field state_parse_ms)+restore$(dst_field restore_ms))"
    echo "MIGBENCH vmm=podvm mem=$1 load=$2 total_ms=${total:-?} downtime_ms=${down:-?} src_downtime_ms=${src_down:-?} rounds=${rounds:-?} status=$status src_rc=$rc phases=${phases:-?}"
    [ "$status" = completed ] || { echo "MIGBENCH-DETAIL podvm $1 $2 last status: $last"; sed 's/^/MIGBENCH-DETAIL src: /' "$d/src.out" | tail -n 20; }
    sleep 3
    kill $dst 2>/dev/null
    wait $dst 2>/dev/null
}

qemu_args() { # MIB LOAD
    echo "-M microvm,pit=on,rtc=on -accel kvm -cpu host -m $1 -smp 1 -nodefaults -no-user-config -nographic -serial none -kernel $kernel -initrd $initrd"
}

run_qemu() { # MIB LOAD
    port=$((port + 1))
    rm -rf "$work/q" && mkdir -p "$work/q"
    d=$work/q
    mkfifo "$d/src.mon" "$d/dst.mon"
    # shellcheck disable=SC2046
    "$qemu" $(qemu_args "$1" "$2") -append "$(cmdline_for "$2")" -monitor stdio \
        <"$d/src.mon" >"$d/src.out" 2>&1 &
    src=$!
    # shellcheck disable=SC2046
    "$qemu" $(qemu_args "$1" "$2") -append "$(cmdline_for "$2")" -monitor stdio \
        -incoming "tcp:127.0.0.1:$port" <"$d/dst.mon" >"$d/dst.out" 2>&1 &
    dst=$!
    exec 3>"$d/src.mon" 4>"$d/dst.mon"
    sleep "${MIGBENCH_SETTLE_S:-20}"
    # The same target as podvm's, and no bandwidth cap (QEMU's default caps at 128 MiB/s).
    echo "migrate_set_parameter downtime-limit $downtime_ms" >&3
    echo "migrate_set_parameter max-bandwidth 100G" >&3
    echo "migrate -d tcp:127.0.0.1:$port" >&3
    status=timeout
    i=0
    while [ $i -lt 600 ]; do
        echo "info migrate" >&3
        sleep 1
        if grep -q 'Migration status: completed' "$d/src.out"; then status=completed; break; fi
        if grep -q 'Migration status: failed' "$d/src.out"; then status=failed; break; fi
        i=$((i + 1))
    done
    total=$(grep 'total time:' "$d/src.out" | tail -n1 | sed -n 's/.*total time: \([0-9]*\).*/\1/p')
    down=$(grep '^downtime:' "$d/src.out" | tail -n1 | sed -n 's/^downtime: \([0-9]*\).*/\1/p')
    # QEMU's passes over the dirty log (the first full one included).
    syncs=$(grep 'dirty sync count:' "$d/src.out" | tail -n1 | sed -n 's/.*count: \([0-9]*\).*/\1/p')
    echo "MIGBENCH vmm=qemu mem=$1 load=$2 total_ms=${total:-?} downtime_ms=${down:-?} src_downtime_ms=${down:-?} dirty_syncs=${syncs:-?} status=$status src_rc=0"
    [ "$status" = completed ] || sed 's/^/MIGBENCH-DETAIL qemu src: /' "$d/src.out" | tail -n 30
    echo quit >&3
    echo quit >&4
    exec 3>&- 4>&-
    wait $src $dst 2>/dev/null
}

echo "MIGBENCH-LOG sandbox: $(nproc) vCPUs, $(($(sed -n 's/MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) / 1024)) MiB, kernel $(uname -r)"
# Each round runs every pair; even rounds put QEMU first, so neither VMM always follows the
# other.
round=1
while [ "$round" -le "${MIGBENCH_ROUNDS:-2}" ]; do
    echo "MIGBENCH-LOG round $round"
    for mib in $sizes; do
        for load in $loads; do
            if [ $((round % 2)) -eq 1 ]; then
                run_podvm "$mib" "$load"
                run_qemu "$mib" "$load"
            else
                run_qemu "$mib" "$load"
                run_podvm "$mib" "$load"
            fi
        done
    done
    round=$((round + 1))
done
echo "MIGBENCH-LOG done"

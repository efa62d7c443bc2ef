#!/bin/sh
# shellcheck shell=sh
#
# benches/blk/in-sandbox.sh: the part of the virtio-blk benchmark that runs
# inside the KVM sandbox (busybox sh, as root). Started by benches/blk/run.sh,
# which ships the files named below and passes the settings as BLKBENCH_*
# environment variables.
#
# 1. Unpacks fio and its libraries (BLKBENCH_CPIO) at /opt/blkbench.
# 2. Makes the two backings, each BLKBENCH_DISK_MIB MiB, filled with zeros so
#    that every block really exists (no holes, no unwritten extents), on one
#    tmpfs at /blkbench:
#      file: a raw image file on ext4. tmpfs has no O_DIRECT (Linux 6.1), so
#            the ext4 lives on a loop device over a file on the tmpfs:
#            /blkbench/ext4.img -> loop -> ext4 (host mke2fs) ->
#            /blkbench/fs/disk.img
#      loop: a loop block device over a file on the tmpfs:
#            /blkbench/loop.img -> /dev/loopN
#    Both take O_DIRECT: ext4 natively, a loop device at the block layer (the
#    loop driver itself does buffered I/O into the tmpfs file).
# 3. For each backing, runs the same four fio jobs (fio-jobs.sh)
#      host:  here, directly against the backing;
#      podvm: in podvm's guest against /dev/vda (--disk BACKING,direct=on);
#      qemu:  in QEMU microvm's guest against /dev/vda (virtio-blk-device,
#             cache=none, aio=io_uring),
#    one after the other; the guests get the same kernel, initramfs, command
#    line, memory and vCPUs.
# 4. Passes the marked lines (BLKBENCH-*) on to its stdout, plus one
#    BLKBENCH-RUN line per run (exit status, wall seconds) and a VMM's stderr
#    as BLKBENCH-VMMLOG lines. The whole console log of each guest stays in
#    /blkbench/logs (gone with the sandbox); only marked lines travel over the
#    sandbox's slow serial console.

set -u

: "${BLKBENCH_CPIO:?}" "${BLKBENCH_KERNEL:?}" "${BLKBENCH_INITRD:?}" "${BLKBENCH_PODVM:?}"
qemu=${BLKBENCH_QEMU:-/usr/bin/qemu-system-x86_64}
mke2fs=${BLKBENCH_MKE2FS:-/usr/sbin/mke2fs}
disk_mib=${BLKBENCH_DISK_MIB:-1024}
runtime=${BLKBENCH_RUNTIME:-15}
ramp=${BLKBENCH_RAMP:-3}
guest_mem=${BLKBENCH_GUEST_MEM:-512}
guest_cpus=${BLKBENCH_GUEST_CPUS:-1}
backings=${BLKBENCH_BACKINGS:-file loop}
vmms=${BLKBENCH_VMMS:-host podvm qemu}
# A guest run takes ~100 s here; a hung guest must not eat the time budget.
vm_timeout=${BLKBENCH_VM_TIMEOUT:-300}
# The test guest's default command line plus quiet, so that kernel messages do
# not interleave with the result lines on the console.
cmdline_base=${BLKBENCH_CMDLINE:-console=ttyS0 reboot=k panic=1 pci=off quiet}

say() { echo "BLKBENCH-LOG $*"; }
die() {
    echo "BLKBENCH-FATAL $*"
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
# elapsed START: seconds since START (a /proc/uptime value), 1 decimal.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_all=$(now)
say "sandbox: $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB," \
    "kernel $(uname -r)"

# --- fio ---------------------------------------------------------------------

(cd / && cpio -idm <"$BLKBENCH_CPIO") 2>/dev/null || die "cannot unpack $BLKBENCH_CPIO"
[ -x /opt/blkbench/bin/fio ] || die "no /opt/blkbench/bin/fio after unpacking"
say "fio: $(/opt/blkbench/lib/ld-linux-x86-64.so.2 --library-path /opt/blkbench/lib \
    /opt/blkbench/bin/fio --version)"

# --- the backings ------------------------------------------------------------

mkdir -p /blkbench
# Room for both images plus ext4's overhead; tmpfs only uses what is written.
mount -t tmpfs -o size=$((disk_mib * 2 + 512))m tmpfs /blkbench || die "mount tmpfs"
mkdir -p /blkbench/logs /blkbench/fs

# attach FILE: attach FILE to a free loop device and print the device.
attach() {
    dev=$(losetup -f) || return 1
    losetup "$dev" "$1" || return 1
    echo "$dev"
}

# fill FILE MIB: write MIB MiB of zeros into FILE, to the disk (fsync).
fill() {
    dd if=/dev/zero of="$1" bs=1M count="$2" conv=fsync 2>/dev/null
}

t=$(now)
for b in $backings; do
    case $b in
        file)
            truncate -s $((disk_mib + 256))M /blkbench/ext4.img
            ext4_loop=$(attach /blkbench/ext4.img) || die "losetup for the ext4 image failed"
            # No lazy initialisation: no ext4lazyinit thread writing inode
            # tables in the background while we measure.
            "$mke2fs" -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 "$ext4_loop" ||
                die "mke2fs failed"
            mount -t ext4 -o noatime "$ext4_loop" /blkbench/fs || die "mount ext4 failed"
            fill /blkbench/fs/disk.img "$disk_mib" || die "filling the disk image failed"
            file_target=/blkbench/fs/disk.img
            say "backing file: $file_target, ${disk_mib} MiB raw file on ext4 on $ext4_loop over /blkbench/ext4.img (tmpfs)"
            ;;
        loop)
            fill /blkbench/loop.img "$disk_mib" || die "filling the loop image failed"
            loop_target=$(attach /blkbench/loop.img) || die "losetup failed"
            say "backing loop: $loop_target, loop device over /blkbench/loop.img (tmpfs, ${disk_mib} MiB)"
            ;;
        *) die "unknown backing $b" ;;
    esac
done
say "backings ready in $(elapsed "$t") s"

# --- the runs ----------------------------------------------------------------

# guest_cmdline BACKING VMM: the kernel command line that makes the test
# guest run fio-jobs.sh against /dev/vda (the script is in the initramfs; only
# the call goes on the command line, base64 as the guest's /init wants it).
guest_cmdline() {
    script="sh /opt/blkbench/fio-jobs.sh /dev/vda $1 $2 $runtime $ramp"
    echo "$cmdline_base podvm.exec=$(printf '%s' "$script" | base64 | tr -d '\n')"
}

# report BACKING VMM STATUS START LOG ERRLOG: pass the marked lines of a run
# on, then its summary line and the VMM's stderr.
report() {
    # A marker can follow other output on a console line; keep what follows
    # it. The guest's tty adds \r at line ends.
    tr -d '\r' <"$5" | grep -a 'BLKBENCH-' | sed 's/^.*\(BLKBENCH-[A-Z]*\)/\1/'
    guest_exit=$(tr -d '\r' <"$5" | sed -n 's/^PODVM-EXIT \([0-9]*\)$/\1/p' | tail -n 1)
    wall=$(elapsed "$4")
    echo "BLKBENCH-RUN $1 $2 status=$3 guest_exit=${guest_exit:--} wall_s=$wall"
    if [ "$2" != host ] && [ -z "$guest_exit" ]; then
        # busybox timeout passes on the VMM's own status (QEMU exits 0 on
        # SIGTERM), so say plainly what happened, with the end of the console.
        echo "BLKBENCH-ERROR $1 $2 - the guest did not finish (no PODVM-EXIT; ${wall} s," \
            "timeout ${vm_timeout} s); last console lines follow"
        tr -d '\r' <"$5" | tail -n 15 | sed "s/^/BLKBENCH-TAIL $1 $2 /"
    fi
    if [ -s "$6" ]; then
        head -n 30 "$6" | sed "s/^/BLKBENCH-VMMLOG $1 $2 /"
    fi
}

for b in $backings; do
    case $b in
        file) target=$file_target ;;
        loop) target=$loop_target ;;
    esac
    for v in $vmms; do
        log=/blkbench/logs/$b-$v.log
        err=/blkbench/logs/$b-$v.err
        : >"$err"
        say "$b/$v: start"
        t=$(now)
        rc=0
        case $v in
            host)
                sh /opt/blkbench/fio-jobs.sh "$target" "$b" host "$runtime" "$ramp" \
                    >"$log" 2>"$err" || rc=$?
                ;;
            podvm)
                timeout "$vm_timeout" "$BLKBENCH_PODVM" run \
                    --kernel "$BLKBENCH_KERNEL" --initrd "$BLKBENCH_INITRD" \
                    --cmdline "$(guest_cmdline "$b" podvm)" \
                    --cpus "$guest_cpus" --memory "$guest_mem" \
                    --disk "$target,direct=on" \
                    </dev/null >"$log" 2>"$err" || rc=$?
                ;;
            qemu)
                # microvm: virtio-mmio devices described to the guest through
                # ACPI (on by default), as podvm does. cache=none is O_DIRECT.
                timeout "$vm_timeout" "$qemu" \
                    -M microvm,pit=on,rtc=on -accel kvm -cpu host \
                    -m "$guest_mem" -smp "$guest_cpus" \
                    -nodefaults -no-user-config -display none \
                    -serial stdio -no-reboot \
                    -kernel "$BLKBENCH_KERNEL" -initrd "$BLKBENCH_INITRD" \
                    -append "$(guest_cmdline "$b" qemu)" \
                    -drive "id=d0,file=$target,format=raw,if=none,cache=none,aio=io_uring" \
                    -device virtio-blk-device,drive=d0 \
                    </dev/null >"$log" 2>"$err" || rc=$?
                ;;
            *) die "unknown VMM $v" ;;
        esac
        report "$b" "$v" "$rc" "$t" "$log" "$err"
    done
done

# Anything the sandbox's own kernel complained about (loop, ext4, kvm).
dmesg | grep -iE 'error|fail|warn|timed out|blk_update|unhandled' | head -n 20 |
    sed 's/^/BLKBENCH-SANDBOX-DMESG /'
say "all done in $(elapsed "$t_all") s"

#!/bin/sh
# shellcheck shell=sh
#
# benches/blk/fio-jobs.sh TARGET BACKING VMM RUNTIME RAMP
#
# The four fio jobs of the virtio-blk benchmark (benches/blk/run.sh), run
# against TARGET (a block device or a regular file) with busybox sh. Used in
# two places with the same fio binary and libraries (/opt/blkbench, unpacked
# from the benchmark's cpio archive):
#
#   - in the KVM sandbox, against the backing itself: the "host" figure;
#   - in the test guest (podvm's or QEMU's), against /dev/vda.
#
# For each job it prints one line
#
#   BLKBENCH-TERSE <BACKING> <VMM> <JOB> <fio terse v3 result line>
#
# (or BLKBENCH-ERROR ... when fio fails). The marker lets the host pick these
# lines out of a console that also carries kernel and VMM messages. In a guest
# (VMM other than "host") it also prints what the guest kernel made of the
# disk (BLKBENCH-INFO) and the kernel log lines that look like trouble
# (BLKBENCH-DMESG). The exit status is 0 when every job gave a result.
#
# BACKING and VMM are labels only. RUNTIME and RAMP are seconds: each job runs
# for RAMP + RUNTIME seconds (--time_based) and reports the last RUNTIME.

set -u
target=$1 backing=$2 vmm=$3 runtime=$4 ramp=$5

# fio from Debian's package, with the libraries it needs next to it; started
# through the dynamic loader shipped with them, so no ld.so.cache or system
# library directory is involved, in the sandbox or in the guest.
R=/opt/blkbench
fio() {
    "$R/lib/ld-linux-x86-64.so.2" --library-path "$R/lib" "$R/bin/fio" "$@"
}

if [ ! -b "$target" ] && [ ! -f "$target" ]; then
    echo "BLKBENCH-ERROR $backing $vmm - no disk at $target"
    # shellcheck disable=SC2012 # for a human to read
    ls -l /dev/vd* /sys/block 2>&1 | sed "s/^/BLKBENCH-ERROR $backing $vmm - /"
    exit 1
fi

if [ "$vmm" != host ]; then
    # What the guest's virtio-blk driver negotiated and set up.
    q=/sys/block/${target#/dev/}/queue
    # shellcheck disable=SC2012 # counting sysfs entries with plain names
    echo "BLKBENCH-INFO $backing $vmm size_bytes=$(($(cat "/sys/block/${target#/dev/}/size") * 512))" \
        "hw_queues=$(ls "/sys/block/${target#/dev/}/mq" | wc -l)" \
        "nr_requests=$(cat "$q"/nr_requests) max_sectors_kb=$(cat "$q"/max_sectors_kb)" \
        "max_segments=$(cat "$q"/max_segments) logical_block=$(cat "$q"/logical_block_size)" \
        "write_cache=$(tr ' ' _ <"$q/write_cache")" \
        "virtio_features=$(cat "/sys/block/${target#/dev/}/device/features" 2>/dev/null)"
fi

status=0
# Job name, fio --rw, block size, queue depth.
for spec in randread:randread:4k:32 randwrite:randwrite:4k:32 \
    seqread:read:1M:8 seqwrite:write:1M:8; do
    IFS=: read -r job rw bs qd <<END
$spec
END
    out=/tmp/blkbench-$job.terse
    # O_DIRECT, libaio, one job, fixed time. --norandommap and --randrepeat=0:
    # plain uniform random offsets, no bookkeeping. Terse v3 is one line of
    # ';'-separated fields, cheap to send over a slow serial console.
    if fio --name="$job" --filename="$target" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --direct=1 --ioengine=libaio --numjobs=1 \
        --time_based --runtime="$runtime" --ramp_time="$ramp" \
        --norandommap --randrepeat=0 --group_reporting \
        --output-format=terse --terse-version=3 --output="$out" \
        >"/tmp/blkbench-$job.err" 2>&1; then
        line=$(grep '^3;' "$out" | head -n 1)
        if [ -n "$line" ]; then
            echo "BLKBENCH-TERSE $backing $vmm $job $line"
        else
            echo "BLKBENCH-ERROR $backing $vmm $job no terse line in fio's output"
            status=1
        fi
    else
        echo "BLKBENCH-ERROR $backing $vmm $job fio failed: $(tail -n 5 "/tmp/blkbench-$job.err" "$out" 2>/dev/null | tr '\n' ' ')"
        status=1
    fi
done

if [ "$vmm" != host ]; then
    # The guest kernel's words about the disk, and anything that looks like
    # trouble (errors, warnings, timeouts).
    dmesg | grep -iE 'error|fail|warn|timed out|blk_update|unhandled|virtio_blk|vda' | head -n 20 |
        sed "s/^/BLKBENCH-DMESG $backing $vmm /"
fi
exit "$status"

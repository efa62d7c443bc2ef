#!/usr/bin/env bash
#
# benches/blk/run.sh: the virtio-blk benchmark. podvm's guest against the same
# fio jobs run directly on the backing ("host") and in QEMU's guest, all in ONE
# run of the KVM sandbox (tests/sandbox/run), on two backings: a raw file on
# ext4 and a loop block device. See benches/blk/README.md.
#
#   benches/blk/run.sh
#
# Steps:
#   1. build what is missing: the test guest (tests/guest/build.sh), podvm
#      (cargo build --release -p launcher, only when the binary is missing or
#      has no --disk; set BLKBENCH_BUILD_PODVM=1 to always build);
#   2. fio from Debian: the fio package and the library packages its
#      dependency closure adds to what this host has installed, downloaded
#      with apt-get download into the shared .deb cache (target/debs) and
#      unpacked with dpkg-deb -x; ldd (with those libraries on
#      LD_LIBRARY_PATH) says which libraries fio loads; fio, these libraries
#      and the dynamic loader are staged under /opt/blkbench together with
#      fio-jobs.sh and packed into an uncompressed cpio archive;
#   3. the benchmark initramfs: the test guest's initramfs.cpio.gz with that
#      archive appended (Linux unpacks every archive of a concatenated initrd);
#   4. the sandbox run (in-sandbox.sh), its output logged;
#   5. the table, from the fio terse lines in the log.
#
# Environment (defaults in brackets):
#   BLKBENCH_RUNTIME     measured seconds per fio job [15]
#   BLKBENCH_RAMP        seconds of ramp before each job's measurement [3]
#   BLKBENCH_DISK_MIB    size of each backing, MiB [1024]
#   BLKBENCH_GUEST_MEM   guest memory, MiB, podvm and QEMU alike [512]
#   BLKBENCH_GUEST_CPUS  guest vCPUs, podvm and QEMU alike [1]
#   BLKBENCH_SANDBOX_MEM sandbox memory, MiB [6144]
#   BLKBENCH_BACKINGS    which backings ["file loop"]
#   BLKBENCH_VMMS        which runs per backing ["host podvm qemu"]
#   BLKBENCH_RETRIES     reruns of the sandbox when it dies [1]
#   BLKBENCH_BUILD_PODVM 1: run cargo build --release -p launcher first [0]
#   BLKBENCH_OUT         output directory [target/blk-bench]
#   BLKBENCH_BUILD_ONLY  1: stop after building the benchmark initramfs [0]
#
# Outputs in BLKBENCH_OUT: sandbox-<stamp>.log (everything the sandbox
# printed), results-<stamp>.md (the table and the set-up), and the build
# products (blkbench.cpio, initramfs-fio.cpio, VERSIONS).

set -euo pipefail

export PODVM_LOG_TAG=blk-bench # the prefix of podvm_log messages
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$here/../../tests/guest/lib.sh" # PODVM_ROOT, PODVM_DEB_CACHE, podvm_log, apt helpers
root=$PODVM_ROOT

runtime=${BLKBENCH_RUNTIME:-15}
ramp=${BLKBENCH_RAMP:-3}
disk_mib=${BLKBENCH_DISK_MIB:-1024}
guest_mem=${BLKBENCH_GUEST_MEM:-512}
guest_cpus=${BLKBENCH_GUEST_CPUS:-1}
sandbox_mem=${BLKBENCH_SANDBOX_MEM:-6144}
backings=${BLKBENCH_BACKINGS:-file loop}
vmms=${BLKBENCH_VMMS:-host podvm qemu}
retries=${BLKBENCH_RETRIES:-1}
out=${BLKBENCH_OUT:-$root/target/blk-bench}
podvm=$root/target/release/podvm
guest_dir=$root/target/guest
qemu=$(command -v qemu-system-x86_64 || true)
mke2fs=/usr/sbin/mke2fs

t_start=$(date +%s)
mkdir -p -- "$out"
podvm_require_cmds apt-get apt-cache dpkg-deb dpkg-query cpio gzip ldd sha256sum \
    qemu-system-x86_64 mke2fs cargo

# --- 1. the test guest and podvm ---------------------------------------------

"$root/tests/guest/build.sh" "$guest_dir" >&2

if [[ ${BLKBENCH_BUILD_PODVM:-0} == 1 || ! -x $podvm ]] ||
    ! "$podvm" run --help 2>/dev/null | grep -q -- '--disk'; then
    podvm_log "building podvm (cargo build --release -p launcher)"
    (cd -- "$root" && cargo build --release -p launcher) >&2
fi

# --- 2. fio and its libraries from Debian -------------------------------------

# The library packages fio's dependency closure needs beyond what this host
# has installed (the rest of fio's libraries are taken from the host, which is
# the same Debian release). apt-cache needs about a second per query here, so
# the answer is remembered until apt's package lists change.
lists=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16)
memo=$out/fio-packages-$lists
if [[ ! -s $memo ]]; then
    podvm_log "resolving fio's library packages"
    {
        echo "fio=$(podvm_resolve_version fio)"
        apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances fio 2>/dev/null |
            grep -E '^lib[^ ]*$' | grep -v -- '-perl$' | LC_ALL=C sort -u |
            while read -r pkg; do
                # Installed here: ldd finds its libraries on the host.
                if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
                    continue
                fi
                echo "$pkg=$(podvm_resolve_version "$pkg")"
            done
    } >"$memo.tmp"
    mv -f -- "$memo.tmp" "$memo"
fi

# Download (cached in target/debs) and unpack each package; collect the
# directories that hold shared libraries.
fio_tree=
libdirs=()
declare -A tree_of=()
while IFS='=' read -r pkg ver; do
    deb=$(podvm_fetch_deb "$pkg" "$ver")
    tree=$(podvm_extract_deb "$deb")
    tree_of[$pkg]=$tree
    [[ $pkg == fio ]] && fio_tree=$tree
    while IFS= read -r d; do
        libdirs+=("$d")
    done < <(find "$tree" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | LC_ALL=C sort -u)
done <"$memo"
[[ -n $fio_tree && -x $fio_tree/usr/bin/fio ]] || podvm_die "no usr/bin/fio in the fio package"

# What fio loads: ldd with the unpacked libraries first on the search path.
libpath=$(IFS=:; echo "${libdirs[*]}")
ldd_out=$(LD_LIBRARY_PATH=$libpath ldd "$fio_tree/usr/bin/fio")
if grep -q 'not found' <<<"$ldd_out"; then
    podvm_die "fio's libraries not all found: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t\n' ' ')"
fi

# The packages that really provided a library. The closure also names
# packages fio never loads (e.g. through alternatives); keep only the useful
# ones in the memo so that later runs neither fetch nor unpack the others.
used=(fio)
for pkg in "${!tree_of[@]}"; do
    [[ $pkg != fio ]] && grep -qF -- "=> ${tree_of[$pkg]}/" <<<"$ldd_out" && used+=("$pkg")
done
grep -E "^($(IFS='|'; echo "${used[*]}"))=" "$memo" >"$memo.tmp"
mv -f -- "$memo.tmp" "$memo"

# Stage /opt/blkbench: bin/fio, lib/<soname> for every library (copied,
# symlinks followed), lib/ld-linux-x86-64.so.2, fio-jobs.sh. fio-jobs.sh runs
# fio through that loader with --library-path lib, so nothing else matters.
stage=$out/stage
rm -rf -- "$stage"
mkdir -p -- "$stage/opt/blkbench/bin" "$stage/opt/blkbench/lib"
cp -- "$fio_tree/usr/bin/fio" "$stage/opt/blkbench/bin/fio"
while read -r a b c _; do
    if [[ $b == '=>' && $c == /* ]]; then
        cp -L -- "$c" "$stage/opt/blkbench/lib/$a"
    elif [[ $a == /*/ld-linux-x86-64.so.2 ]]; then
        cp -L -- "$a" "$stage/opt/blkbench/lib/ld-linux-x86-64.so.2"
    fi
done <<<"$ldd_out"
[[ -f $stage/opt/blkbench/lib/ld-linux-x86-64.so.2 ]] || podvm_die "ldd named no dynamic loader"
install -m 0755 -- "$here/fio-jobs.sh" "$stage/opt/blkbench/fio-jobs.sh"
# Reproducible archive: fixed mtimes and owners, sorted names, newc.
find "$stage" -exec touch -h -d @0 -- {} +
(
    cd -- "$stage"
    find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet
) >"$out/blkbench.cpio"

# --- 3. the benchmark initramfs -----------------------------------------------

# An uncompressed archive after a gzip one must start 4-byte aligned.
initrd=$out/initramfs-fio.cpio
base_size=$(stat -c %s -- "$guest_dir/initramfs.cpio.gz")
{
    cat -- "$guest_dir/initramfs.cpio.gz"
    head -c $(((4 - base_size % 4) % 4)) /dev/zero
    cat -- "$out/blkbench.cpio"
} >"$initrd"

{
    sed -n 's/^fio=/fio_version=/p' "$memo"
    echo "extra_packages=$(grep -v '^fio=' "$memo" | tr '\n' ' ')"
    echo "libraries=$(find "$stage/opt/blkbench/lib" -type f | wc -l)"
    echo "blkbench_cpio_bytes=$(stat -c %s -- "$out/blkbench.cpio")"
    echo "initrd_bytes=$(stat -c %s -- "$initrd")"
    echo "initrd_sha256=$(sha256sum <"$initrd" | cut -d' ' -f1)"
} >"$out/VERSIONS"
podvm_log "benchmark initramfs: $initrd ($(($(stat -c %s -- "$initrd") >> 20)) MiB," \
    "$(find "$stage/opt/blkbench/lib" -type f | wc -l) libraries with fio)"
[[ ${BLKBENCH_BUILD_ONLY:-0} == 1 ]] && exit 0

# --- 4. the sandbox run -------------------------------------------------------

stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=$out/sandbox-$stamp.log
sandbox_cmd=(
    "$root/tests/sandbox/run" --mem "$sandbox_mem" --cpus 2
    --file "$podvm" --file "$qemu" --file /usr/share/qemu --file /usr/share/seabios
    --file "$mke2fs" --file /etc/mke2fs.conf
    --file "$guest_dir/vmlinuz" --file "$initrd" --file "$out/blkbench.cpio"
    --file "$here/in-sandbox.sh"
    --env "BLKBENCH_CPIO=$out/blkbench.cpio" --env "BLKBENCH_KERNEL=$guest_dir/vmlinuz"
    --env "BLKBENCH_INITRD=$initrd" --env "BLKBENCH_PODVM=$podvm"
    --env "BLKBENCH_QEMU=$qemu" --env "BLKBENCH_MKE2FS=$mke2fs"
    --env "BLKBENCH_DISK_MIB=$disk_mib" --env "BLKBENCH_RUNTIME=$runtime"
    --env "BLKBENCH_RAMP=$ramp" --env "BLKBENCH_GUEST_MEM=$guest_mem"
    --env "BLKBENCH_GUEST_CPUS=$guest_cpus" --env "BLKBENCH_BACKINGS=$backings"
    --env "BLKBENCH_VMMS=$vmms"
    -- sh "$here/in-sandbox.sh"
)
podvm_log "podvm: $podvm (sha256 $(sha256sum <"$podvm" | cut -c1-16)," \
    "built $(date -u -r "$podvm" +%FT%TZ)); the source tree is now at $(git -C "$root" rev-parse --short HEAD)$(
        git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"

# This machine is shared: the load around the run says how much to trust it.
podvm_log "host load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
attempt=0
while :; do
    attempt=$((attempt + 1))
    podvm_log "sandbox run $attempt, log $log"
    t_run=$(date +%s)
    rc=0
    # Everything goes to the log; on the terminal, fio's long terse lines are
    # cut to the figures that matter (terse v3 fields: see the table below).
    # rc is the sandbox's status, not the display's.
    "${sandbox_cmd[@]}" > >(tee -a -- "$log" | awk -F';' '
        /^BLKBENCH-TERSE / { split($1, h, " ")
            printf "%s %s %s %s: read %s IOPS %s KiB/s, write %s IOPS %s KiB/s, error %s\n",
                h[1], h[2], h[3], h[4], $8, $7, $49, $48, $5; fflush(); next }
        { print; fflush() }') 2>&1 || rc=$?
    sleep 1 # let the display drain
    podvm_log "sandbox run $attempt ended with status $rc after $(($(date +%s) - t_run)) s"
    # 125: the sandbox itself failed (QEMU died, timeout); no BLKBENCH-FATAL
    # and no "all done": it died under us. Either way, retry while allowed.
    if ((rc == 0)) && grep -q 'BLKBENCH-LOG all done' "$log"; then
        break
    fi
    if ((attempt > retries)); then
        podvm_log "error: the sandbox run failed $attempt time(s); see $log"
        break
    fi
    podvm_log "retrying (BLKBENCH_RETRIES=$retries)"
    # Results of the failed attempt must not mix with the new one.
    mv -- "$log" "$log.attempt$attempt"
done

# --- 5. the table -----------------------------------------------------------

# fio terse v3: field 1 is the version (3), 3 the job name, 5 the error;
# read: 7 bandwidth KiB/s, 8 IOPS; write: 48 bandwidth KiB/s, 49 IOPS.
# Lines: BLKBENCH-TERSE BACKING VMM JOB TERSE.
results=$out/results-$stamp.md
awk -v backings="$backings" -v runtime="$runtime" -v ramp="$ramp" '
    $1 == "BLKBENCH-TERSE" {
        n = split($5, f, ";")
        if (n < 49 || f[1] != "3" || f[5] != "0") { bad[$2 " " $4 " " $3] = 1; next }
        if ($4 == "randread")  v = f[8]
        if ($4 == "randwrite") v = f[49]
        if ($4 == "seqread")   v = f[7] * 1024 / 1e6
        if ($4 == "seqwrite")  v = f[48] * 1024 / 1e6
        val[$2 " " $4 " " $3] = v
    }
    function show(k, job) {
        if (!(k in val)) return (k in bad) ? "fio error" : "-"
        return (job ~ /^rand/) ? sprintf("%.0f", val[k]) : sprintf("%.1f", val[k])
    }
    function ratio(a, b) {
        if (!(a in val) || !(b in val) || val[b] == 0) return "-"
        return sprintf("%.2f", val[a] / val[b])
    }
    END {
        label["randread"] = "randread 4k QD32 (IOPS)"
        label["randwrite"] = "randwrite 4k QD32 (IOPS)"
        label["seqread"] = "seq read 1M QD8 (MB/s)"
        label["seqwrite"] = "seq write 1M QD8 (MB/s)"
        bname["file"] = "raw file on ext4"
        bname["loop"] = "loop block device"
        print "| backing | job | host | podvm | QEMU | podvm/host | podvm/QEMU |"
        print "|---|---|---|---|---|---|---|"
        nb = split(backings, bs, " ")
        split("randread randwrite seqread seqwrite", jobs, " ")
        for (i = 1; i <= nb; i++) for (j = 1; j <= 4; j++) {
            b = bs[i]; job = jobs[j]; k = b " " job
            printf "| %s | %s | %s | %s | %s | %s | %s |\n", bname[b], label[job],
                show(k " host", job), show(k " podvm", job), show(k " qemu", job),
                ratio(k " podvm", k " host"), ratio(k " podvm", k " qemu")
        }
        printf "\nfio %s s measured after %s s ramp per job; MB/s = 10^6 bytes/s.\n", runtime, ramp
    }
' "$log" >"$results"
{
    echo
    echo "Runs, guest info and anything that went wrong (from $log):"
    echo
    grep -E '^BLKBENCH-(RUN|INFO|ERROR|FATAL|TAIL|DMESG|VMMLOG|SANDBOX-DMESG|LOG)' "$log" | sed 's/^/    /' || true
    echo
    echo "Total wall time: $(($(date +%s) - t_start)) s ($attempt sandbox run(s));" \
        "host load average (1/5/15 min) at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
} >>"$results"
echo
cat -- "$results"
grep -q '^BLKBENCH-TERSE' "$log" || exit 1

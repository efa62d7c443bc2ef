#!/usr/bin/env bash
#
# benches/net/run.sh: the network benchmark. TCP throughput both ways and
# TCP connection rate from the same guest with the same tools, in ONE run of
# the KVM sandbox (tests/sandbox/run): podvm's user-mode NAT against QEMU's
# user networking (slirp) and QEMU with passt, and podvm's tap backend
# against QEMU's tap, each with vhost-net off and on. See
# benches/net/README.md.
#
#   benches/net/run.sh
#
# Steps:
#   1. build what is missing: the test guest (tests/guest/build.sh), podvm
#      (cargo build --release -p launcher, only when target/release/podvm is
#      missing or has no --net tap=NAME,vhost=on|off; NETBENCH_PODVM names
#      another binary and is never built), connrate (gcc -O2 -static benches/net/connrate.c);
#   2. passt from Debian (apt-get download into the shared .deb cache,
#      target/debs, dpkg-deb -x); it needs only libc, which the sandbox
#      ships with it;
#   3. the pod side's programs: iperf3 and the libraries it loads, taken
#      from the test guest's initramfs (so the pod runs the very iperf3 the
#      guest runs), and connrate, staged under /opt/netbench and packed into
#      an uncompressed cpio archive (netbench-sandbox.cpio);
#   4. the benchmark initramfs: the test guest's initramfs.cpio.gz with an
#      archive holding /opt/netbench/guest.sh and connrate appended (Linux
#      unpacks every archive of a concatenated initrd);
#   5. the sandbox run (in-sandbox.sh), its output logged;
#   6. the tables, from the NETBENCH-RESULT lines of the log.
#
# Environment (defaults in brackets):
#   NETBENCH_SECONDS      iperf3 -t, per direction (plus 1 s omitted, -O 1) [10]
#   NETBENCH_CONN_SECONDS connrate's duration [10]
#   NETBENCH_ROUNDS       rounds over all configurations, every other one in
#                         reverse order; the tables give the mean [2]
#   NETBENCH_GUEST_MEM    guest memory, MiB, every VMM alike [512]
#   NETBENCH_GUEST_CPUS   guest vCPUs, every VMM alike [1]
#   NETBENCH_SANDBOX_MEM  sandbox memory, MiB [4096]
#   NETBENCH_CONFIGS      which configurations, in this order [podvm-user
#                         qemu-slirp qemu-passt podvm-user-1500 podvm-tap
#                         qemu-tap podvm-tap-vhost qemu-tap-vhost]; also
#                         podvm-user-noseccomp (--seccomp off: what the
#                         filters cost) and podvm-user-b (--net user with
#                         the binary NETBENCH_PODVM_B), not run unless named
#   NETBENCH_VM_TIMEOUT   seconds before a run is stopped [180]
#   NETBENCH_STALL_TIMEOUT seconds without console output before a run is
#                         stopped [60]
#   NETBENCH_GDB          a gdb to ship, for backtraces of a hung VMM (empty:
#                         none) [the host's gdb, if any]
#   NETBENCH_RETRIES      reruns of the sandbox when it dies [1]
#   NETBENCH_PODVM        the podvm binary [target/release/podvm]
#   NETBENCH_PODVM_B      a second podvm binary, for an A/B comparison of two
#                         builds in one run (configuration podvm-user-b) []
#   NETBENCH_BUILD_PODVM  1: run cargo build --release -p launcher first [0]
#   NETBENCH_OUT          output directory [target/net-bench]
#   NETBENCH_BUILD_ONLY   1: stop after building the archives [0]
#
# Outputs in NETBENCH_OUT: sandbox-<stamp>.log (everything the sandbox
# printed), results-<stamp>.md (the tables and the set-up), and the build
# products (connrate, netbench-sandbox.cpio, netbench-guest.cpio,
# initramfs-net.cpio, vmlinuz, VERSIONS).

set -euo pipefail

export PODVM_LOG_TAG=net-bench # the prefix of podvm_log messages
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/guest/lib.sh
. "$here/../../tests/guest/lib.sh" # PODVM_ROOT, PODVM_DEB_CACHE, podvm_log, apt helpers
root=$PODVM_ROOT

secs=${NETBENCH_SECONDS:-10}
conn_secs=${NETBENCH_CONN_SECONDS:-10}
rounds=${NETBENCH_ROUNDS:-2}
guest_mem=${NETBENCH_GUEST_MEM:-512}
guest_cpus=${NETBENCH_GUEST_CPUS:-1}
sandbox_mem=${NETBENCH_SANDBOX_MEM:-4096}
configs=${NETBENCH_CONFIGS:-podvm-user qemu-slirp qemu-passt podvm-user-1500 podvm-tap qemu-tap podvm-tap-vhost qemu-tap-vhost}
vm_timeout=${NETBENCH_VM_TIMEOUT:-180}
stall_timeout=${NETBENCH_STALL_TIMEOUT:-60}
gdb=${NETBENCH_GDB-$(command -v gdb || true)}
retries=${NETBENCH_RETRIES:-1}
out=${NETBENCH_OUT:-$root/target/net-bench}
podvm=${NETBENCH_PODVM:-$root/target/release/podvm}
podvm_b=${NETBENCH_PODVM_B:-}
guest_dir=$root/target/guest
qemu=$(command -v qemu-system-x86_64 || true)
ipcmd=/usr/sbin/ip # iproute2: busybox's ip has no tuntap and no dummy links

t_start=$(date +%s)
mkdir -p -- "$out"
podvm_require_cmds apt-get apt-cache dpkg-deb dpkg-query cpio gzip ldd sha256sum \
    qemu-system-x86_64 gcc cargo
[[ -x $ipcmd ]] || podvm_die "no $ipcmd; install it with: apt-get install -y iproute2"
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] ||
    podvm_die "no static libc for connrate; install it with: apt-get install -y libc6-dev"

# --- 1. the test guest, podvm, connrate ------------------------------------

"$root/tests/guest/build.sh" "$guest_dir" >&2

if [[ -z ${NETBENCH_PODVM:-} ]] && { [[ ${NETBENCH_BUILD_PODVM:-0} == 1 || ! -x $podvm ]] ||
    ! "$podvm" run --help 2>/dev/null | grep -q -- 'vhost=on|off'; }; then
    podvm_log "building podvm (cargo build --release -p launcher)"
    (cd -- "$root" && cargo build --release -p launcher) >&2
fi
"$podvm" run --help 2>/dev/null | grep -q -- 'vhost=on|off' ||
    podvm_die "$podvm is too old: it has no --net tap=NAME,vhost=on|off"

connrate=$out/connrate
if [[ ! -x $connrate || $here/connrate.c -nt $connrate ]]; then
    podvm_log "building connrate"
    gcc -O2 -Wall -Wextra -static -o "$connrate" "$here/connrate.c"
fi

# --- 2. passt from Debian ------------------------------------------------------

passt_ver=$(podvm_resolve_version passt)
passt_tree=$(podvm_extract_deb "$(podvm_fetch_deb passt "$passt_ver")")
passt=$passt_tree/usr/bin/passt
[[ -x $passt ]] || podvm_die "no usr/bin/passt in the passt package"

# --- 3. the pod side's programs ------------------------------------------------

# iperf3 from the guest's initramfs: the same binary and libraries as in the
# guest. ldd, with the guest's library directories first, says what it loads.
groot=$out/guest-root
rm -rf -- "$groot"
mkdir -p -- "$groot"
(cd -- "$groot" && gzip -dc <"$guest_dir/initramfs.cpio.gz" |
    cpio -idm --quiet --no-absolute-filenames 'usr/bin/iperf3' 'lib/x86_64-linux-gnu/*' 'usr/lib/x86_64-linux-gnu/*')
[[ -f $groot/usr/bin/iperf3 ]] || podvm_die "no usr/bin/iperf3 in the test guest's initramfs"
glibs=$groot/lib/x86_64-linux-gnu:$groot/usr/lib/x86_64-linux-gnu
ldd_out=$(LD_LIBRARY_PATH=$glibs ldd "$groot/usr/bin/iperf3")
if grep -q 'not found' <<<"$ldd_out"; then
    podvm_die "iperf3's libraries not all found: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t\n' ' ')"
fi

stage=$out/stage-sandbox
rm -rf -- "$stage"
sroot=$stage/opt/netbench/root
mkdir -p -- "$stage/opt/netbench/bin" "$sroot/usr/bin" "$sroot/lib/x86_64-linux-gnu"
cp -- "$connrate" "$stage/opt/netbench/bin/connrate"
cp -- "$groot/usr/bin/iperf3" "$sroot/usr/bin/iperf3"
while read -r a b c _; do
    if [[ $b == '=>' && $c == "$groot"/* ]]; then
        # Keep the guest's layout (lib/ or usr/lib/), symlinks followed.
        rel=${c#"$groot"/}
        mkdir -p -- "$sroot/${rel%/*}"
        cp -L -- "$c" "$sroot/${rel%/*}/$a"
    elif [[ $b == '=>' ]]; then
        podvm_die "iperf3 loads $a from the host ($c), not from the guest's tree"
    fi
done <<<"$ldd_out"
cp -L -- "$groot/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$sroot/lib/x86_64-linux-gnu/"

# mkcpio DIR OUT: a reproducible newc archive of DIR's contents.
mkcpio() {
    find "$1" -exec touch -h -d @0 -- {} +
    (
        cd -- "$1"
        find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
            cpio --null --create --format=newc --owner=0:0 --reproducible --quiet
    ) >"$2"
}
mkcpio "$stage" "$out/netbench-sandbox.cpio"

# --- 4. the benchmark initramfs and kernel ------------------------------------

gstage=$out/stage-guest
rm -rf -- "$gstage"
mkdir -p -- "$gstage/opt/netbench"
install -m 0755 -- "$connrate" "$gstage/opt/netbench/connrate"
install -m 0755 -- "$here/guest.sh" "$gstage/opt/netbench/guest.sh"
mkcpio "$gstage" "$out/netbench-guest.cpio"

# Copies: the test guest may be rebuilt by someone else during the run.
initrd=$out/initramfs-net.cpio
kernel=$out/vmlinuz
cp -- "$guest_dir/vmlinuz" "$kernel"
base_size=$(stat -c %s -- "$guest_dir/initramfs.cpio.gz")
{
    cat -- "$guest_dir/initramfs.cpio.gz"
    # An uncompressed archive after a gzip one must start 4-byte aligned.
    head -c $(((4 - base_size % 4) % 4)) /dev/zero
    cat -- "$out/netbench-guest.cpio"
} >"$initrd"

qemu_pkg=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo unknown)
{
    echo "passt_version=$passt_ver"
    echo "qemu_version=$qemu_pkg"
    grep -E '^(kernel_package|kernel_version|program_packages)=' "$guest_dir/VERSIONS" |
        sed 's/^program_packages=/guest_program_packages=/'
    echo "podvm=$podvm"
    echo "podvm_sha256=$(sha256sum <"$podvm" | cut -d' ' -f1)"
    echo "initrd_sha256=$(sha256sum <"$initrd" | cut -d' ' -f1)"
} >"$out/VERSIONS"
podvm_log "benchmark initramfs: $initrd ($(($(stat -c %s -- "$initrd") >> 20)) MiB);" \
    "pod-side archive $(($(stat -c %s -- "$out/netbench-sandbox.cpio") >> 10)) KiB"
[[ ${NETBENCH_BUILD_ONLY:-0} == 1 ]] && exit 0

# --- 5. the sandbox run -------------------------------------------------------

stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=$out/sandbox-$stamp.log
# gdb, for backtraces of a VMM that hangs, needs its Python's standard
# library and its data directory (about 55 MB more in the sandbox).
gdb_files=()
if [[ -n $gdb ]]; then
    gdb_files=(--file "$gdb" --env "NETBENCH_GDB=$gdb")
    py=$(ldd "$gdb" | grep -o 'libpython3\.[0-9]*' | head -n 1 | sed 's/^lib//')
    [[ -n $py && -d /usr/lib/$py ]] && gdb_files+=(--file "/usr/lib/$py")
    [[ -d /usr/share/gdb ]] && gdb_files+=(--file /usr/share/gdb)
fi
b_files=()
if [[ -n $podvm_b ]]; then
    [[ -x $podvm_b ]] || podvm_die "NETBENCH_PODVM_B=$podvm_b is not an executable"
    podvm_b=$(realpath -- "$podvm_b")
    b_files=(--file "$podvm_b" --env "NETBENCH_PODVM_B=$podvm_b")
elif [[ " $configs " == *" podvm-user-b "* ]]; then
    podvm_die "configuration podvm-user-b needs NETBENCH_PODVM_B (a second podvm binary)"
fi
sandbox_cmd=(
    "$root/tests/sandbox/run" --mem "$sandbox_mem" --cpus 2
    --file "$podvm" --file "$qemu" --file /usr/share/qemu --file /usr/share/seabios
    --file "$ipcmd" --file "$passt_tree/usr/bin"
    --file "$kernel" --file "$initrd" --file "$out/netbench-sandbox.cpio"
    --file "$here/in-sandbox.sh"
    "${gdb_files[@]}"
    "${b_files[@]}"
    --env "NETBENCH_CPIO=$out/netbench-sandbox.cpio" --env "NETBENCH_KERNEL=$kernel"
    --env "NETBENCH_INITRD=$initrd" --env "NETBENCH_PODVM=$podvm"
    --env "NETBENCH_QEMU=$qemu" --env "NETBENCH_PASST=$passt" --env "NETBENCH_IP=$ipcmd"
    --env "NETBENCH_SECONDS=$secs" --env "NETBENCH_CONN_SECONDS=$conn_secs"
    --env "NETBENCH_GUEST_MEM=$guest_mem" --env "NETBENCH_GUEST_CPUS=$guest_cpus"
    --env "NETBENCH_CONFIGS=$configs" --env "NETBENCH_VM_TIMEOUT=$vm_timeout"
    --env "NETBENCH_STALL_TIMEOUT=$stall_timeout" --env "NETBENCH_ROUNDS=$rounds"
    -- sh "$here/in-sandbox.sh"
)
podvm_log "podvm: $podvm (sha256 $(sha256sum <"$podvm" | cut -c1-16)," \
    "built $(date -u -r "$podvm" +%FT%TZ)); the source tree is now at $(git -C "$root" rev-parse --short HEAD)$(
        git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"
podvm_log "host load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
attempt=0
while :; do
    attempt=$((attempt + 1))
    podvm_log "sandbox run $attempt, log $log"
    t_run=$(date +%s)
    rc=0
    # Each NETBENCH-RUN line (the end of one VM) gets this host's 1-minute
    # load average: about 1-2 is the sandbox alone; more means something else
    # ran on this machine during that VM and its figures are not comparable.
    "${sandbox_cmd[@]}" > >(
        while IFS= read -r line; do
            [[ $line == NETBENCH-RUN\ * ]] && line+=" host_load1=$(cut -d' ' -f1 /proc/loadavg)"
            printf '%s\n' "$line"
        done | tee -a -- "$log"
    ) 2>&1 || rc=$?
    sleep 1 # let the display drain
    podvm_log "sandbox run $attempt ended with status $rc after $(($(date +%s) - t_run)) s"
    if ((rc == 0)) && grep -q 'NETBENCH-LOG all done' "$log"; then
        break
    fi
    if ((attempt > retries)); then
        podvm_log "error: the sandbox run failed $attempt time(s); see $log"
        break
    fi
    podvm_log "retrying (NETBENCH_RETRIES=$retries)"
    mv -- "$log" "$log.attempt$attempt"
done

# --- 6. the tables --------------------------------------------------------------

# NETBENCH-RESULT LABEL up|down|conn VALUE, once per round; the MTU from the
# guest's "NETBENCH-INFO LABEL eth0: ADDR mtu N" line. A cell is the mean over
# the rounds that produced the figure.
results=$out/results-$stamp.md
awk -v secs="$secs" -v conn_secs="$conn_secs" -v rounds="$rounds" '
    $1 == "NETBENCH-RESULT" {
        k = $2 " " $3
        sum[k] += $4
        n[k]++
        cur[$3] = $4
    }
    $1 == "NETBENCH-INFO" && $3 == "eth0:" {
        for (i = 4; i < NF; i++) if ($i == "mtu") mtu[$2] = $(i + 1)
    }
    $1 == "NETBENCH-RUN" {
        if (/ retrying=1/) next
        runs[$2]++
        if (/ timed_out=1/) hung[$2]++
        else if (/ guest_exit=- /) died[$2]++
        load = "?"
        for (i = 3; i <= NF; i++) if ($i ~ /^host_load1=/) load = substr($i, 12)
        rnd = $3
        sub(/^round=/, "", rnd)
        per[$2] = per[$2] sprintf("\n    %-16s round %s: up %s, conn %s, conn8 %s, down %s (host load %s)", $2, rnd,
            ("up" in cur) ? cur["up"] : "-", ("conn" in cur) ? cur["conn"] : "-",
            ("conn8" in cur) ? cur["conn8"] : "-", ("down" in cur) ? cur["down"] : "-", load)
        delete cur
    }
    $1 == "NETBENCH-PARTIAL" { delete cur }
    function mean(k) { return sum[k] / n[k] }
    function cell(c, k, base,    v, star) {
        if (!((c " " k) in n)) return (c in hung) ? "hung" : (c in died) ? "failed" : "-"
        v = mean(c " " k)
        star = (n[c " " k] < runs[c]) ? "*" : ""
        if (!((base " " k) in n) || mean(base " " k) == 0) return sprintf("%.1f%s", v, star)
        return sprintf("%.1f%s (x%.2f)", v, star, v / mean(base " " k))
    }
    function row(c) {
        printf "| %s | %s | %s | %s | %s | %s |\n", name[c], (c in mtu) ? mtu[c] : "-",
            cell(c, "up", base[c]), cell(c, "down", base[c]), cell(c, "conn", base[c]),
            cell(c, "conn8", base[c])
    }
    END {
        name["podvm-user"] = "podvm `--net user`"
        name["podvm-user-1500"] = "podvm `--net user,mtu=1500` (reference)"
        name["podvm-user-noseccomp"] = "podvm `--net user --seccomp off` (reference)"
        name["podvm-user-b"] = "podvm `--net user`, binary B (A/B)"
        name["qemu-slirp"] = "QEMU `-netdev user` (slirp)"
        name["qemu-passt"] = "QEMU + passt"
        name["podvm-tap"] = "podvm `--net tap=tap0,vhost=off`"
        name["qemu-tap"] = "QEMU `-netdev tap,vhost=off`"
        name["podvm-tap-vhost"] = "podvm `--net tap=tap0,vhost=on`"
        name["qemu-tap-vhost"] = "QEMU `-netdev tap,vhost=on`"
        base["podvm-user"] = base["qemu-slirp"] = base["qemu-passt"] = "podvm-user"
        base["podvm-user-1500"] = base["podvm-user-noseccomp"] = base["podvm-user-b"] = "podvm-user"
        base["podvm-tap"] = base["qemu-tap"] = "podvm-tap"
        base["podvm-tap-vhost"] = base["qemu-tap-vhost"] = "podvm-tap-vhost"
        all = "podvm-user qemu-slirp qemu-passt podvm-user-1500 podvm-user-noseccomp podvm-user-b podvm-tap qemu-tap podvm-tap-vhost qemu-tap-vhost"
        nall = split(all, cs, " ")
        head = "| VMM, backend | guest MTU | guest→pod (Mbit/s) | pod→guest (Mbit/s) | connections/s, 1 at a time | connections/s, 8 threads |\n|---|---|---|---|---|---|"
        print "User-mode networking (ratios relative to podvm `--net user`):\n"
        print head
        for (i = 1; i <= 6; i++) if (cs[i] in runs) row(cs[i])
        print "\nTap (ratios relative to podvm with the same vhost setting):\n"
        print head
        for (i = 7; i <= nall; i++) if (cs[i] in runs) row(cs[i])
        printf "\nMean of %s round(s); iperf3 -t %s -O 1, one stream, the receiver'"'"'s figure;\n", rounds, secs
        printf "connections: %s s of sequential connect + wait for the server'"'"'s FIN + close\n", conn_secs
        printf "(connrate), in one thread, then in 8 threads at once. Order in the guest: up,\n"
        print "connections (1, then 8 threads), down. *: fewer rounds than asked"
        print "gave this figure; \"hung\": the VM stopped making progress and was stopped;"
        print "\"failed\": the guest died (details below).\n"
        printf "Per round, with this host'"'"'s 1-minute load average when the VM ended (the\n"
        printf "sandbox alone makes about 1-2):\n"
        for (i = 1; i <= nall; i++) if (cs[i] in runs) printf "%s", per[cs[i]]
        print ""
    }
' "$log" >"$results"
{
    echo
    echo "Runs, guest info and anything that went wrong (from $log):"
    echo
    grep -E '^NETBENCH-(RUN|INFO|DETAIL|PARTIAL|ERROR|FATAL|TAIL|QEMULOG|HANG|COUNTERS|VMMLOG|PASSTLOG|IPERFSERVER|SANDBOX-DMESG|LOG)' "$log" |
        sed 's/^/    /' || true
    echo
    echo "Total wall time: $(($(date +%s) - t_start)) s ($attempt sandbox run(s));" \
        "host load average (1/5/15 min) at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
} >>"$results"
echo
cat -- "$results"
grep -q '^NETBENCH-RESULT' "$log" || exit 1

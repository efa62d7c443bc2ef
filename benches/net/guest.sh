#!/bin/sh
# shellcheck shell=sh
#
# benches/net/guest.sh: the part of the network benchmark that runs in the
# guest (the test guest's busybox sh, as root). run.sh puts it, with the
# static connrate, at /opt/netbench in an archive appended to the test
# guest's initramfs; in-sandbox.sh calls it through podvm.exec=:
#
#   sh /opt/netbench/guest.sh LABEL NET SERVER IPERF_SECONDS CONN_SECONDS
#
#   LABEL   the configuration's name, repeated on every result line
#   NET     dhcp (busybox udhcpc; the MTU option is applied when offered)
#           or static:ADDR/PREFIX:GATEWAY
#   SERVER  the pod-side address: iperf3 -s on port 5201, connrate server on
#           port 5300
#
# Runs, in this order: iperf3 guest->pod (client sends), connrate for
# CONN_SECONDS one connection at a time, then with 8 client threads, iperf3
# pod->guest (-R). Prints NETBENCH-* lines:
#   NETBENCH-INFO LABEL ...            address, MTU, virtio features
#   NETBENCH-RESULT LABEL up|down MBIT receiver's Mbit/s (10^6 bit/s)
#   NETBENCH-RESULT LABEL conn RATE    connections per second, one at a time
#   NETBENCH-RESULT LABEL conn8 RATE   connections per second, 8 threads at once
#   NETBENCH-DETAIL LABEL ...          iperf3's summary lines, connrate's line
#   NETBENCH-ERROR LABEL ...           something failed
#   NETBENCH-GUEST-DONE LABEL          then 2 s of sleep, so that the sandbox
#                                      can read podvm's counters

label=$1 net=$2 server=$3 secs=$4 conn_secs=$5
iperf_port=5201
conn_port=5300
cr=/opt/netbench/connrate

info() { echo "NETBENCH-INFO $label $*"; }
err() { echo "NETBENCH-ERROR $label $*"; }

ip link set lo up
ip link set eth0 up

case $net in
    dhcp)
        cat >/tmp/dhcp.sh <<'EOS'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add $ip/$mask dev $interface
  [ -n "$mtu" ] && ip link set $interface mtu $mtu
  for r in $router; do ip route add default via $r; done
  echo "NETBENCH-DHCP ip=$ip/$mask router=$router mtu=${mtu:-none}";;
esac
EOS
        chmod +x /tmp/dhcp.sh
        udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /tmp/dhcp.sh >/tmp/dhcp.out 2>&1 ||
            err "udhcpc failed: $(tr '\n' ' ' </tmp/dhcp.out)"
        sed -n "s/^NETBENCH-DHCP /NETBENCH-INFO $label dhcp: /p" /tmp/dhcp.out
        ;;
    static:*)
        addr=${net#static:}
        gw=${addr#*:}
        addr=${addr%%:*}
        ip addr add "$addr" dev eth0
        ip route add default via "$gw"
        ;;
    *) err "unknown NET $net" ;;
esac

# What the guest got: address, MTU, and the virtio-net features it negotiated
# (bit string from sysfs, bit 0 first; the interesting ones named).
feat=$(cat /sys/class/net/eth0/device/features 2>/dev/null)
named=
for f in 0:CSUM 1:GUEST_CSUM 3:MTU 7:GUEST_TSO4 11:HOST_TSO4 15:MRG_RXBUF 28:INDIRECT_DESC \
    29:EVENT_IDX 32:VERSION_1; do
    bit=${f%%:*}
    [ "$(echo "$feat" | cut -c$((bit + 1)))" = 1 ] && named="$named ${f#*:}"
done
info "eth0: $(ip -4 -o addr show dev eth0 | awk '{ print $4 }') mtu $(cat /sys/class/net/eth0/mtu)" \
    "route: $(ip route | grep default | tr -s ' ')"
info "virtio features:${named:- none} (${feat})"
info "kernel $(uname -r), $(nproc) vCPU, iperf3 $(iperf3 --version 2>/dev/null | head -n 1 | awk '{ print $2 }')"

# Wait until the pod side answers (a slow DHCP or ARP must not eat into the
# first measurement).
if ! $cr probe "$server" "$conn_port" 30; then
    err "$server:$conn_port not reachable"
fi

# iperf3 DIRECTION [-R]: one run; the receiver's figure is the result.
run_iperf() {
    dir=$1
    shift
    out=/tmp/iperf-$dir.txt
    timeout $((secs + 60)) iperf3 -c "$server" -p "$iperf_port" -t "$secs" -O 1 -f m \
        "$@" >"$out" 2>&1
    rc=$?
    grep -E 'sender|receiver' "$out" | tr -s ' ' | sed "s/^/NETBENCH-DETAIL $label $dir: /"
    mbit=$(awk '/receiver/ { for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i - 1) }
        END { if (v != "") print v }' "$out")
    if [ -n "$mbit" ]; then
        echo "NETBENCH-RESULT $label $dir $mbit"
    else
        err "iperf3 $dir failed (status $rc): $(tail -n 3 "$out" | tr '\n' ' ')"
    fi
}
run_iperf up
# conn: one connection at a time (the latency of a connection through the backend);
# conn8: eight client threads at once (how many connections the backend handles).
for par in 1 8; do
    kind=conn
    [ "$par" = 1 ] || kind=conn$par
    if line=$($cr client "$server" "$conn_port" "$conn_secs" "$par"); then
        echo "NETBENCH-DETAIL $label $kind: $line"
        echo "NETBENCH-RESULT $label $kind $(echo "$line" | sed -n 's/.* rate=\([0-9.]*\) .*/\1/p')"
    else
        err "connrate $kind failed: $line"
    fi
done
run_iperf down -R

echo "NETBENCH-GUEST-DONE $label"
sleep 2

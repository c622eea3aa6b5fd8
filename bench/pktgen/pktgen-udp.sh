#!/usr/bin/env bash
# Kernel pktgen: UDP to a NodePort over a real NIC, bounded by COUNT per thread.
# Usage: pktgen-udp.sh DEV DST_IP DST_MAC DST_PORT COUNT [THREADS]   (FLOWS=new|one)
set -euo pipefail
dev=$1 dst_ip=$2 dst_mac=$3 dst_port=$4 count=$5 threads=${6:-1}
flows=${FLOWS:-new}
modprobe pktgen
pg() { echo "$2" > "/proc/net/pktgen/$1"; }
for ((t = 0; t < threads; t++)); do
    pg "kpktgend_$t" "rem_device_all"
    pg "kpktgend_$t" "add_device $dev@$t"
    pg "$dev@$t" "count $count"
    pg "$dev@$t" "pkt_size 64"
    pg "$dev@$t" "dst $dst_ip"
    pg "$dev@$t" "dst_mac $dst_mac"
    pg "$dev@$t" "udp_dst_min $dst_port"
    pg "$dev@$t" "udp_dst_max $dst_port"
    if [ "$flows" = new ]; then
        pg "$dev@$t" "udp_src_min 1024"
        pg "$dev@$t" "udp_src_max 65535"
        pg "$dev@$t" "flag UDPSRC_RND"
    else
        pg "$dev@$t" "udp_src_min $((40000 + t))"
        pg "$dev@$t" "udp_src_max $((40000 + t))"
    fi
    pg "$dev@$t" "burst 32"
done
pg pgctrl start
for ((t = 0; t < threads; t++)); do
    grep -E "pps|Result" "/proc/net/pktgen/$dev@$t"
done

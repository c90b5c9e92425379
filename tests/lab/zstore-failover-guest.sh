#!/bin/bash
# Guest side of the VIP tests: the kernel initiator logs in through the redirector's VIP,
# the host takes the chunk server holding the session away (SIGKILL, or drain) while a write
# loop runs, and the session must come back through the VIP on another chunk server with every
# byte intact. ("FAILOVER ... stall": the longest gap between two completed writes.)
# Args: VIP_PORTAL TARGET_IQN LUN WWN INITIATOR_IQN
#   /share/payload is copied onto the volume before the loop (the host reads it back later).
# Prints "FAILOVER portal_before=... portal_after=... stall=S typical=S writes=N" for the host.
. /job/lib.sh
set -euo pipefail
VIP=${1:?vip ip:port}; IQN=${2:?target iqn}; LUN=${3:?lun}; WWN=${4:?wwn}; INIT=${5:?initiator iqn}
WWN=$(echo "${WWN#0x}" | tr A-F a-f)
BYID=/dev/disk/by-id/wwn-0x$WWN
LOOP_MIN_AFTER=12       # writes that must complete after the host's kill
LOOP_DEADLINE=200       # seconds: the loop is bounded whatever happens
REPLACEMENT_TIMEOUT=60  # I/O waits this long for a new session before failing (default 120)
[ -f /share/payload ] || die "no /share/payload (run-vm.sh --share DIR)"

portal_now() { iscsiadm -m session -P 1 | awk '/Current Portal:/ {print $3; exit}' | sed 's/,.*//'; }
uptime_s() { awk '{print $1}' /proc/uptime; }

step "initiator $INIT; open-iscsi tuned for failover"
echo "InitiatorName=$INIT" > /etc/iscsi/initiatorname.iscsi
# Node records take these from iscsid.conf when discovery creates them. NOPs every 2 s find a
# dead connection that sent no FIN/RST within ~4 s; the replacement timeout bounds the stall
# the upper layers see before I/O errors (so a pass proves the stall is below it).
sed -i -E \
    -e "s/^#?\s*node.session.timeo.replacement_timeout\s*=.*/node.session.timeo.replacement_timeout = $REPLACEMENT_TIMEOUT/" \
    -e 's/^#?\s*node.conn\[0\].timeo.noop_out_interval\s*=.*/node.conn[0].timeo.noop_out_interval = 2/' \
    -e 's/^#?\s*node.conn\[0\].timeo.noop_out_timeout\s*=.*/node.conn[0].timeo.noop_out_timeout = 2/' \
    /etc/iscsi/iscsid.conf
grep -E '^node.session.timeo.replacement_timeout|^node.conn\[0\].timeo.noop_out' /etc/iscsi/iscsid.conf
modprobe iscsi_tcp
iscsid

step "discovery at the VIP $VIP"
iscsiadm -m discovery -t sendtargets -p "$VIP" | tee /tmp/disc.txt
grep -qx "$VIP,[0-9]* $IQN" /tmp/disc.txt || die "target $IQN not advertised at the VIP $VIP"
step "login through the VIP"
iscsiadm -m node -T "$IQN" -p "$VIP" --login
udevadm settle
iscsiadm -m session -P 3 | grep -E 'Target:|Current Portal|Persistent Portal|iSCSI Session State|Attached scsi disk'
BEFORE=$(portal_now)
[ -n "$BEFORE" ] && [ "$BEFORE" != "$VIP" ] || die "expected a redirect away from the VIP, got '$BEFORE'"
step "redirected to $BEFORE"
wait_blk "$BYID" 30 || { ls -l /dev/disk/by-id/ || true; die "no $BYID"; }
DEV=$(readlink -f "$BYID")
step "LUN $LUN is $DEV ($(blockdev --getsize64 "$DEV") bytes)"

step "mkfs.ext4 + mount + payload"
mkfs.ext4 -q -F "$BYID"
mkdir -p /mnt/vol
mount "$BYID" /mnt/vol
cp /share/payload /mnt/vol/payload
SUM=$(sha256sum < /share/payload)
mkdir -p /mnt/vol/loop
sync

# The loop: 1 MiB of fresh random data per file, written O_DIRECT + fsync so each write really
# reaches the target while it runs; its checksum and completion time are kept in guest RAM.
write_loop() {
    local i=0 after=0 t0 now blob
    t0=$(uptime_s)
    : > /tmp/done.times
    while :; do
        blob=/tmp/blob
        head -c 1048576 /dev/urandom > "$blob"
        echo "$(sha256sum < "$blob" | cut -c1-64)  f$i" >> /tmp/manifest
        dd if="$blob" of=/mnt/vol/loop/f$i bs=1M oflag=direct conv=fsync status=none
        now=$(uptime_s)
        echo "$now" >> /tmp/done.times
        i=$((i + 1))
        echo "$i" > /tmp/done.count
        if [ -f /job/hook_done ]; then after=$((after + 1)); fi
        [ "$after" -ge "$LOOP_MIN_AFTER" ] && break
        awk -v a="$t0" -v b="$now" -v d="$LOOP_DEADLINE" 'BEGIN{exit !(b - a > d)}' && {
            echo "write loop: deadline of ${LOOP_DEADLINE}s reached after $i writes"; return 1; }
    done
    echo "write loop: $i writes, $after after the host's kill"
}

step "write loop starts"
rm -f /tmp/manifest /tmp/done.count
write_loop > /tmp/loop.log 2>&1 &
LOOP=$!
for _ in $(seq 600); do [ "$(cat /tmp/done.count 2>/dev/null || echo 0)" -ge 5 ] && break; sleep 0.1; done
[ "$(cat /tmp/done.count 2>/dev/null || echo 0)" -ge 5 ] || die "the write loop does not progress"
step "asking the host to take away the chunk server holding the session ($BEFORE)"
lab_host_hook 60 || die "host hook failed ($?)"
step "host hook done; waiting for the loop"
LRC=0; wait $LOOP || LRC=$?
cat /tmp/loop.log
dmesg | grep -E "connection[0-9]+:|session[0-9]+:" | tail -8 || true     # the recovery, as the kernel saw it
[ $LRC = 0 ] || { dmesg | tail -30; die "write loop failed ($LRC)"; }
AFTER=$(portal_now)
iscsiadm -m session -P 3 | grep -E 'Current Portal|Persistent Portal|iSCSI Session State'
[ -n "$AFTER" ] && [ "$AFTER" != "$BEFORE" ] && [ "$AFTER" != "$VIP" ] || \
    die "session should be on another chunk server: before $BEFORE, after '$AFTER'"
STALL=$(awk 'NR > 1 { g = $1 - p; if (g > max) max = g } { p = $1 } END { printf "%.1f", max }' /tmp/done.times)
TYPICAL=$(awk 'NR > 1 { print $1 - p } { p = $1 }' /tmp/done.times | sort -n | \
    awk '{ a[NR] = $1 } END { printf "%.2f", a[int((NR + 1) / 2)] }')
WRITES=$(wc -l < /tmp/manifest)
step "session moved $BEFORE -> $AFTER; longest gap between writes ${STALL}s (median ${TYPICAL}s)"

step "filesystem still read-write, no I/O errors"
grep -q " /mnt/vol ext4 rw[ ,]" /proc/mounts || { grep /mnt/vol /proc/mounts; die "/mnt/vol is not rw"; }
if dmesg | grep -E "I/O error|EXT4-fs error|Remounting filesystem read-only|Buffer I/O error"; then
    die "the kernel saw I/O errors"
fi
echo "after failover" > /mnt/vol/after.txt
sync

step "remount (caches dropped) + verify every byte"
umount /mnt/vol
echo 3 > /proc/sys/vm/drop_caches
mount "$BYID" /mnt/vol
[ "$(sha256sum < /mnt/vol/payload)" = "$SUM" ] || die "payload checksum mismatch"
(cd /mnt/vol/loop && sha256sum -c --quiet /tmp/manifest) || die "loop files do not verify"
[ "$(cat /mnt/vol/after.txt)" = "after failover" ] || die "after.txt mismatch"
umount /mnt/vol
step "logout"
blockdev --flushbufs "$DEV"
iscsiadm -m node -T "$IQN" -p "$VIP" --logout
udevadm settle
echo "FAILOVER portal_before=$BEFORE portal_after=$AFTER stall=$STALL typical=$TYPICAL writes=$WRITES"
step "zstore failover test PASSED"

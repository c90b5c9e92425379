#!/bin/bash
# Guest side of test_lab_lio.py: a zstore chunk server with --frontend lio in the VM, the rest of
# the cluster (etcd, meta, a chunk server holding the replicas) in the lab netns on the host.
# /share (run-vm.sh --share): site/ (host venv site-packages), repo/ (chunk, zstore, meta, tests/lab
# helpers), token, spec.json (volumes, IQNs, configs), payload. Everything left in /job for the host.
. /job/lib.sh
set -euo pipefail
export PYTHONPATH=/share/repo:/share/site PYTHONDONTWRITEBYTECODE=1
SPEC=/share/spec.json
j() { python3 -c "import json,sys; d=json.load(open('$SPEC')); print(eval(sys.argv[1], {}, d))" "$1"; }
IQN=$(j 'target_iqn'); INIT=$(j 'guest_iqn'); PORTAL=$(j 'lio_portal'); BI_PORTAL=$(j 'builtin_portal')
LUN_DATA=$(j 'luns["lio-data"]'); LUN_LB=$(j 'luns["lio-bench"]'); LUN_BB=$(j 'luns["bi-bench"]')
LUN_CONF=$(j 'luns["lio-conf"]'); EXTRA=$(j 'extra_iqn')
TPG=/sys/kernel/config/target/iscsi/$IQN/tpgt_1
zstore() { ZSTORE_CONFIG=/share/client.toml python3 -m zstore.cli.main "$@"; }

step "modules, initiator $INIT"
modprobe -a target_core_mod iscsi_target_mod target_core_user iscsi_tcp
echo "InitiatorName=$INIT" > /etc/iscsi/initiatorname.iscsi
iscsid

step "a foreign LIO object the chunk server must leave alone"
python3 - <<'PY'
from rtslib_fb import FabricModule, FileIOStorageObject, LUN, RTSRoot, TPG, Target
RTSRoot()
so = FileIOStorageObject("foreign1", "/var/tmp/foreign1.img", size=16 << 20, write_back=False)
LUN(TPG(Target(FabricModule("iscsi"), "iqn.2026-01.lab.foreign:keep"), 1), 0, so)
PY

start_lio() {
    python3 -m chunk.server --config /share/chunk-lio.toml >> /job/chunk-lio.log 2>&1 &
    echo $! > /tmp/chunk-lio.pid
}
wait_applied() {   # wait_applied N: the Nth "LIO frontend: portal" line in the log
    for _ in $(seq 600); do
        [ "$(grep -c 'LIO frontend: portal' /job/chunk-lio.log || true)" -ge "$1" ] && return 0
        kill -0 "$(cat /tmp/chunk-lio.pid)" 2>/dev/null || { tail -30 /job/chunk-lio.log; die "lio chunk server exited"; }
        sleep 0.1
    done
    tail -30 /job/chunk-lio.log; die "lio chunk server did not apply the catalog"
}
lio_state() {   # every configfs object under our target and the backstores, with key values
    ( cd /sys/kernel/config/target && find iscsi core -maxdepth 6 \
        \( -path '*/statistics' -o -path '*/alua' -o -path '*/pr' -o -path '*/wwn/*' -o -path '*/fabric_statistics' \) -prune -o -print \
        | grep -E '^(iscsi/iqn|core/(user|fileio)_[0-9]+/)' | grep -vE '/(attrib|param|auth)/' | sort
      for f in "$TPG"/acls/*/lun_*/write_protect "$TPG"/acls/*/auth/userid; do echo "$f=$(cat "$f")"; done ) 2>/dev/null
}

step "start the chunk server with --frontend lio (portal $PORTAL)"
: > /job/chunk-lio.log
start_lio
python3 -m chunk.server --config /share/chunk-builtin.toml > /job/chunk-builtin.log 2>&1 &
echo $! > /tmp/chunk-builtin.pid
wait_applied 1
targetcli ls / 2>&1 | sed -n '1,60p'

step "LIO holds what etcd says"
[ -d "$TPG" ] || die "no LIO target $IQN"
[ "$(cat $TPG/enable)" = 1 ] || die "TPG not enabled"
ls "$TPG/np" | grep -qx "${PORTAL}" || die "no network portal $PORTAL: $(ls $TPG/np)"
for l in $LUN_DATA $LUN_LB $LUN_CONF; do
    [ -d "$TPG/lun/lun_$l" ] || die "no LUN $l"
    so=$(find "$TPG/lun/lun_$l" -maxdepth 1 -type l -exec readlink -f {} \; | head -1)
    echo "LUN $l -> ${so#/sys/kernel/config/target/core/}"
    case $so in */core/user_*/zs-*) ;; *) die "LUN $l is not on a zstore user: backstore ($so)" ;; esac
done
ls "$TPG/acls" | sort | tee /tmp/acls.txt
grep -qx "$INIT" /tmp/acls.txt || die "no ACL for $INIT"
[ -d "$TPG/acls/$INIT/lun_$LUN_DATA" ] || die "$INIT not mapped to LUN $LUN_DATA"
[ ! -d "$TPG/acls/$INIT/lun_$LUN_CONF" ] || die "$INIT sees LUN $LUN_CONF (masking broken)"
for so in /sys/kernel/config/target/core/user_*/zs-*; do
    echo "backstore $so: $(cat $so/info | tr -s ' \n' ' ' | cut -c1-160)"
done
grep '^tcm-user/' /sys/class/uio/uio*/name
python3 -c "import rtslib_fb; print('LIO_STATE targets', [t.wwn for t in rtslib_fb.RTSRoot().targets])"
echo "LIO_OBJECTS luns=$(ls $TPG/lun | wc -l) acls=$(ls $TPG/acls | wc -l) backstores=$(ls -d /sys/kernel/config/target/core/user_*/zs-* | wc -l)"

step "host: iscsi-test-cu against LIO and the built-in target (lab hook)"
hook_rc=0; lab_host_hook 2000 || hook_rc=$?
step "hook exited $hook_rc"
[ $hook_rc = 0 ] || die "host conformance hook failed ($hook_rc)"

step "kernel initiator -> LIO over loopback ($PORTAL)"
login_scan() {   # login_scan PORTAL LUN...: manual scan of just these LUNs; prints the host number
    local portal=$1; shift
    iscsiadm -m discovery -t st -p "$portal" >/dev/null
    iscsiadm -m node -T "$IQN" -p "$portal" -o update -n node.session.scan -v manual
    iscsiadm -m node -T "$IQN" -p "$portal" --login >/dev/null
    local h
    h=$(iscsiadm -m session -P 3 | awk -v p="$portal" '/Current Portal:/{cur=$3} /Host Number:/{ if (index(cur, p)==1) print $3 }' | head -1)
    for l in "$@"; do echo "0 0 $l" > /sys/class/scsi_host/host$h/scan; done
    udevadm settle
    echo "$h"
}
HL=$(login_scan "$PORTAL" $LUN_DATA $LUN_LB)
DEV_DATA=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-$LUN_DATA
DEV_LB=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-$LUN_LB
wait_blk "$DEV_DATA" 30 || die "no $DEV_DATA"
wait_blk "$DEV_LB" 30 || die "no $DEV_LB"
D=$(readlink -f "$DEV_DATA")
step "LIO LUN $LUN_DATA is $D: $(cat /sys/block/${D#/dev/}/device/vendor) $(cat /sys/block/${D#/dev/}/device/model), $(blockdev --getsize64 $D) bytes"
sg_vpd -p di "$D" | sed -n '1,8p' || true
mkfs.ext4 -q -F "$D"
mkdir -p /mnt/vol; mount "$D" /mnt/vol
cp /share/payload /mnt/vol/payload
echo "written through LIO and TCMU" > /mnt/vol/hello.txt
SUM=$(sha256sum < /share/payload)
umount /mnt/vol; echo 3 > /proc/sys/vm/drop_caches
mount "$D" /mnt/vol
[ "$(sha256sum < /mnt/vol/payload)" = "$SUM" ] || die "payload checksum mismatch after remount"
umount /mnt/vol; blockdev --flushbufs "$D"
step "LIO ext4 write/read PASSED (sha256 ${SUM%% *})"

step "ACL add/remove in etcd changes LIO live"
zstore acl add lio-conf "$EXTRA" >/dev/null
for _ in $(seq 200); do [ -d "$TPG/acls/$EXTRA/lun_$LUN_CONF" ] && break; sleep 0.1; done
[ -d "$TPG/acls/$EXTRA/lun_$LUN_CONF" ] || die "ACL $EXTRA did not appear in LIO"
step "ACL $EXTRA appeared with LUN $LUN_CONF mapped"
printf 'lio-chap-secret-0123\n' > /tmp/sec; printf 'lio-mutual-secret-99\n' > /tmp/msec
zstore chap set "$IQN" "$EXTRA" --user extra-user --secret-file /tmp/sec --mutual-user tgt-user --mutual-secret-file /tmp/msec >/dev/null
for _ in $(seq 200); do [ "$(cat $TPG/acls/$EXTRA/auth/userid 2>/dev/null)" = extra-user ] && break; sleep 0.1; done
[ "$(cat $TPG/acls/$EXTRA/auth/userid)" = extra-user ] || die "CHAP user not applied"
[ "$(cat $TPG/acls/$EXTRA/auth/userid_mutual)" = tgt-user ] || die "mutual CHAP user not applied"
echo "CHAP on ACL $EXTRA: userid=$(cat $TPG/acls/$EXTRA/auth/userid) mutual=$(cat $TPG/acls/$EXTRA/auth/userid_mutual) authentication=$(cat $TPG/acls/$EXTRA/attrib/authentication 2>/dev/null || echo n/a)"
zstore acl remove lio-conf "$EXTRA" >/dev/null
for _ in $(seq 200); do [ ! -d "$TPG/acls/$EXTRA" ] && break; sleep 0.1; done
[ ! -d "$TPG/acls/$EXTRA" ] || die "ACL $EXTRA still in LIO after acl remove"
step "LIO ACL live add/remove PASSED"

step "a volume deleted in etcd leaves LIO: its LUN, backstore and uio device go, the rest stays"
LUN_BC=$(j 'luns["bi-conf"]'); BC_SO=zs-$(j 'vids["bi-conf"]')
ls -d /sys/kernel/config/target/core/user_*/"$BC_SO" >/dev/null || die "no backstore $BC_SO to begin with"
zstore volume delete bi-conf --force >/dev/null
gone() { [ ! -d "$TPG/lun/lun_$LUN_BC" ] && ! ls -d /sys/kernel/config/target/core/user_*/"$BC_SO" >/dev/null 2>&1 \
         && ! grep -q "/$BC_SO/" /sys/class/uio/uio*/name 2>/dev/null; }
for _ in $(seq 300); do gone && break; sleep 0.1; done
gone || die "LUN $LUN_BC / backstore $BC_SO still in LIO after the volume was deleted"
[ -d "$TPG/lun/lun_$LUN_DATA" ] || die "LUN $LUN_DATA went too"
echo "LIO_DELETE lun=$LUN_BC backstore=$BC_SO gone; luns=$(ls $TPG/lun | wc -l) backstores=$(ls -d /sys/kernel/config/target/core/user_*/zs-* | wc -l)"

step "benchmark: LIO+TCMU vs the built-in target, both served by chunk servers in this VM"
HB=$(login_scan "$BI_PORTAL" $LUN_BB)
DEV_BB=/dev/disk/by-path/ip-$BI_PORTAL-iscsi-$IQN-lun-$LUN_BB
wait_blk "$DEV_BB" 30 || die "no $DEV_BB"
python3 /share/repo/tests/lab/lio-bench.py lio "$(readlink -f $DEV_LB)" 8 32
python3 /share/repo/tests/lab/lio-bench.py builtin "$(readlink -f $DEV_BB)" 8 32
iscsiadm -m node -T "$IQN" -p "$BI_PORTAL" --logout >/dev/null

step "restart the lio chunk server: LIO stays the same, nothing twice, the session goes on"
lio_state > /tmp/state.before
kill -TERM "$(cat /tmp/chunk-lio.pid)"
for _ in $(seq 300); do kill -0 "$(cat /tmp/chunk-lio.pid)" 2>/dev/null || break; sleep 0.1; done
kill -0 "$(cat /tmp/chunk-lio.pid)" 2>/dev/null && die "lio chunk server did not stop"
grep -o 'zs-[0-9a-f]*(uio[0-9]*): served .*' /job/chunk-lio.log || true
lio_state > /tmp/state.stopped
start_lio
wait_applied 2
lio_state > /tmp/state.after
diff /tmp/state.before /tmp/state.stopped || die "LIO changed when the chunk server stopped"
diff /tmp/state.before /tmp/state.after || die "LIO changed across the restart"
echo "LIO_RESTART objects=$(wc -l < /tmp/state.after) unchanged"
[ -d /sys/kernel/config/target/iscsi/iqn.2026-01.lab.foreign:keep ] || die "the foreign target is gone"
ls -d /sys/kernel/config/target/core/fileio_*/foreign1 >/dev/null || die "the foreign backstore is gone"
mount "$D" /mnt/vol
[ "$(sha256sum < /mnt/vol/payload)" = "$SUM" ] || die "payload mismatch after the restart"
echo "after restart" > /mnt/vol/after.txt
umount /mnt/vol; blockdev --flushbufs "$D"
iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout >/dev/null
step "stop the chunk servers"
kill -TERM "$(cat /tmp/chunk-lio.pid)" "$(cat /tmp/chunk-builtin.pid)" || true
for _ in $(seq 300); do kill -0 "$(cat /tmp/chunk-lio.pid)" 2>/dev/null || break; sleep 0.1; done
tail -n 5 /job/chunk-lio.log
step "zstore lio test PASSED"

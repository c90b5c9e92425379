#!/bin/bash
# Guest side of the zstore test: the stock kernel's initiator (open-iscsi) against a zstore chunk
# server's built-in target, the way a Kubernetes node will use it.
# Args: PORTAL TARGET_IQN LUN WWN INITIATOR_IQN
#   WWN: the volume's 32-hex-digit NAA-6 id; udev must publish /dev/disk/by-id/wwn-0x<WWN>,
#        which is how the CSI node plugin will find the disk.
#   INITIATOR_IQN: the name on the volume's ACL; we take it instead of the image's random one.
# /share/payload (run-vm.sh --share) is copied onto the volume; the host reads it back later.
. /job/lib.sh
set -euo pipefail
PORTAL=${1:?portal ip:port}; IQN=${2:?target iqn}; LUN=${3:?lun}; WWN=${4:?wwn}; INIT=${5:?initiator iqn}
WWN=$(echo "${WWN#0x}" | tr A-F a-f)      # udev writes the id in lower case
BYID=/dev/disk/by-id/wwn-0x$WWN
BYPATH=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-$LUN
[ -f /share/payload ] || die "no /share/payload (run-vm.sh --share DIR)"

step "initiator $INIT"
echo "InitiatorName=$INIT" > /etc/iscsi/initiatorname.iscsi
modprobe iscsi_tcp
iscsid
step "discovery (sendtargets) at $PORTAL"
iscsiadm -m discovery -t sendtargets -p "$PORTAL" | tee /tmp/disc.txt
# the chunk server must advertise its portal as configured, or the node could not log in
grep -qx "$PORTAL,[0-9]* $IQN" /tmp/disc.txt || die "target $IQN not advertised at $PORTAL"
step "login"
iscsiadm -m node -T "$IQN" -p "$PORTAL" --login
udevadm settle
iscsiadm -m session -P 3 | grep -E 'Target:|Current Portal|iSCSI Session State|Attached scsi disk'
wait_blk "$BYID" 30 || { ls -l /dev/disk/by-id/ /dev/disk/by-path/ || true; die "no $BYID"; }
DEV=$(readlink -f "$BYID")
[ "$(readlink -f "$BYPATH")" = "$DEV" ] || die "$BYPATH does not point at $DEV"
step "LUN $LUN is $DEV ($(blockdev --getsize64 "$DEV") bytes), $(cat /sys/block/${DEV#/dev/}/device/vendor) $(cat /sys/block/${DEV#/dev/}/device/model)"
lsscsi -t
sg_vpd -p di "$DEV" | sed -n '1,12p' || true

step "mkfs.ext4 + mount + write"
mkfs.ext4 -q -F "$BYID"
mkdir -p /mnt/vol
mount "$BYID" /mnt/vol
cp /share/payload /mnt/vol/payload
echo "hello from the kernel initiator" > /mnt/vol/hello.txt
SUM=$(sha256sum < /share/payload)
umount /mnt/vol
echo 3 > /proc/sys/vm/drop_caches       # the read-back below must come from the target
step "remount + read back"
mount "$BYID" /mnt/vol
[ "$(sha256sum < /mnt/vol/payload)" = "$SUM" ] || die "payload checksum mismatch after remount"
[ "$(cat /mnt/vol/hello.txt)" = "hello from the kernel initiator" ] || die "hello.txt mismatch"
df -h /mnt/vol | tail -1
umount /mnt/vol
step "logout"
blockdev --flushbufs "$DEV"
iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout
udevadm settle
if iscsiadm -m session >/dev/null 2>&1; then die "session still present after logout"; fi
[ ! -e "$BYID" ] || die "$BYID still present after logout"
step "zstore initiator test PASSED (payload sha256 ${SUM%% *})"

#!/bin/bash
# Guest side of test_lab_crash.py: one zstore chunk server whose whole state (chunk id, disks,
# extents) lives on an ext4 file system on the extra disk /dev/vdb (run-vm.sh --disk), with etcd
# and meta on the host. Argument: boot1 (mkfs first; the host hook writes through this chunk
# server's portal and then hard-kills the VM, so this script never returns) or boot2 (the same
# disk after the crash: mount replays the journal, the same chunk server starts, the host hook
# reads back, then a clean stop).
# /share: site/ + repo/ (the host venv and repo, as for test_lab_lio.py), token, chunk-crash.toml.
. /job/lib.sh
set -euo pipefail
export PYTHONPATH=/share/repo:/share/site PYTHONDONTWRITEBYTECODE=1
PHASE=${1:?boot1 or boot2}
DISK=/dev/vdb MNT=/mnt/crash
PORTAL_PORT=$(python3 -c "import tomllib; print(tomllib.load(open('/share/chunk-crash.toml','rb'))['chunk']['portal'].rsplit(':',1)[1])")

# Nothing may reach the disk unless someone syncs: no periodic or background writeback. Then a
# write the chunk server did not fdatasync is certainly lost when the host kills the VM, and a
# write that survives did so because of a flush (the test would prove nothing otherwise).
sysctl -q -w vm.dirty_writeback_centisecs=0 vm.dirty_expire_centisecs=360000 \
    vm.dirty_background_ratio=90 vm.dirty_ratio=90

wait_blk "$DISK" 30 || die "no $DISK (run-vm.sh --disk)"
mkdir -p "$MNT"
if [ "$PHASE" = boot1 ]; then
    step "mkfs.ext4 $DISK ($(blockdev --getsize64 $DISK) bytes)"
    mkfs.ext4 -q -F "$DISK"
fi
dmesg -C
mount -t ext4 "$DISK" "$MNT"
step "mounted $DISK on $MNT"
dmesg | grep -i 'EXT4-fs' || true
if [ "$PHASE" = boot2 ]; then
    echo "CHUNK_ID $(cat $MNT/zs/chunk-id)"
    ls -la "$MNT/zs/disk0" | head -40 || true
fi

step "start the chunk server (data on $MNT, portal :$PORTAL_PORT)"
python3 -m chunk.server --config /share/chunk-crash.toml >> "/job/chunk-$PHASE.log" 2>&1 &
CPID=$!
for _ in $(seq 1800); do
    (exec 3<>"/dev/tcp/${LAB_IP%/*}/$PORTAL_PORT") 2>/dev/null && break
    kill -0 $CPID 2>/dev/null || { tail -40 "/job/chunk-$PHASE.log"; die "chunk server exited"; }
    sleep 0.1
done
kill -0 $CPID 2>/dev/null || die "chunk server not running"
step "chunk server up (pid $CPID)"
[ "$PHASE" = boot1 ] && echo "CHUNK_ID $(cat $MNT/zs/chunk-id)"

sysctl vm.dirty_writeback_centisecs vm.dirty_expire_centisecs
step "host hook ($PHASE)"
hook_rc=0; lab_host_hook 1200 || hook_rc=$?
if [ "$PHASE" = boot1 ]; then
    die "the host hook returned ($hook_rc) instead of killing the VM"
fi
step "hook exited $hook_rc"
[ $hook_rc = 0 ] || { tail -40 /job/chunk-boot2.log; die "host read-back hook failed ($hook_rc)"; }

step "stop the chunk server"
kill -TERM $CPID
for _ in $(seq 300); do kill -0 $CPID 2>/dev/null || break; sleep 0.1; done
kill -0 $CPID 2>/dev/null && die "chunk server did not stop"
umount "$MNT"
step "zstore crash test boot2 PASSED"

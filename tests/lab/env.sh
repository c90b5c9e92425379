# Defaults shared by every lab script (sourced, never run).  Each one can be overridden from
# the environment; they are exported so that the scripts a script starts agree with it.
# All state lives under $ZSTORE_LAB_DIR, so a clone of zstore needs nothing outside the repo.
export ZSTORE_LAB_DIR=${ZSTORE_LAB_DIR:-/tmp/zstore-lab}
export LAB_OUT=${LAB_OUT:-$ZSTORE_LAB_DIR/image}        # vmlinuz, initrd.img, rootfs.img
export LAB_CACHE=${LAB_CACHE:-$ZSTORE_LAB_DIR/cache}    # kernel .deb, debootstrap tree
export LAB_RUNS=${LAB_RUNS:-$ZSTORE_LAB_DIR/runs}       # one dir per VM run (console log, job)
export LAB_LOGS=${LAB_LOGS:-$ZSTORE_LAB_DIR/test-logs}  # run-all-tests.sh's per-test logs
# the private network between host netns and guest (only ever inside a netns we create)
export LAB_TAP=${LAB_TAP:-labtap0}
export LAB_HOST_IP=${LAB_HOST_IP:-192.168.77.1}
export LAB_GUEST_IP=${LAB_GUEST_IP:-192.168.77.2}

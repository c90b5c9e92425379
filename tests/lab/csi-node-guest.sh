#!/bin/bash
# Guest side of test_csi_node_lifecycle: the zstore CSI node plugin (python -m csi.server
# --mode node) runs here as on a Kubernetes node, and csi-node-client.py drives it as kubelet
# would. /share (run-vm.sh --share) holds site/ (the host venv's site-packages: Debian's grpcio
# is too old), repo/ (csi, zstore and the client), payload and spec.json.
# Args: INITIATOR_IQN (the node id; the host put it on the volumes' ACLs before boot)
. /job/lib.sh
set -euo pipefail
INIT=${1:?initiator iqn}
[ -f /share/spec.json ] || die "no /share/spec.json (run-vm.sh --share DIR)"

step "initiator $INIT"
echo "InitiatorName=$INIT" > /etc/iscsi/initiatorname.iscsi
modprobe iscsi_tcp
iscsid
mkdir -p /run/csi
export PYTHONPATH=/share/repo:/share/site PYTHONDONTWRITEBYTECODE=1
step "driving the node plugin"
if python3 /share/repo/tests/lab/csi-node-client.py /share/spec.json; then rc=0; else rc=$?; fi
echo "--- plugin log"; tail -n 60 /tmp/plugin.log || true
[ $rc = 0 ] || die "client exit $rc"
step "csi node test PASSED"

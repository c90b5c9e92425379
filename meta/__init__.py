"""Meta server: the cluster's control plane over etcd (API, leader election, placement, liveness)."""

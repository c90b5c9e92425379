"""iSCSI login redirector on the cluster VIP (issue: redirector)."""

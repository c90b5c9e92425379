"""CSI driver: Identity, Controller and Node services (issue: CSI driver)."""

"""What the cluster is, for people and scrapers:
the status snapshot, metrics, the exporter, the kept collective results."""

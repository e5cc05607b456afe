"""nf integrations."""

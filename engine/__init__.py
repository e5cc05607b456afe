"""nf engine."""

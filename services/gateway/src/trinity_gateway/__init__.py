"""Trinity."""

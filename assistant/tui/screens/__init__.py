"""The chat's screens (there is one)."""

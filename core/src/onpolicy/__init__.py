"""onpolicy core."""

"""onpolicy trainer service."""

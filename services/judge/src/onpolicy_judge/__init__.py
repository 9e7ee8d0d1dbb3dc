"""onpolicy judge service."""

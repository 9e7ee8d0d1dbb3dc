"""onpolicy sampler service."""

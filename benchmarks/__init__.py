"""Benchmarks (``make bench``): each compares the service with a plain baseline in one run."""

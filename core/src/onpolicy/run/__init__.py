"""The on-policy loop as one command (``onpolicy run``): stack, services, rounds, report."""

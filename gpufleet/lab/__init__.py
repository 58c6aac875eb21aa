"""The local lab: simulated GPU hosts (sshd in network namespaces) behind a login node (gpufleet.lab.core)."""

VENDORS = ("nvidia", "amd", "gaudi", "tenstorrent", "mixed", "none")  # `lab up --vendor`: what the nodes simulate

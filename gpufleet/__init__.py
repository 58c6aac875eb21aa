"""gpufleet: GPU fleets over SSH, sliced into blocks, driven by Ansible."""

__version__ = "0.1.0"

"""gpufleet: GPU fleets over SSH, sliced into blocks, driven by Ansible."""

from importlib.metadata import PackageNotFoundError, version

try:  # the installed distribution's version, which the build reads from galaxy.yml (stated once, there)
    __version__ = version("gpufleet")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

"""The control plane: `gpufleet server`, an HTTP API that queues runs and starts them on the fleets, and
the support it needs (its settings, its API token, the key that seals the secrets of waiting runs, and
a systemd unit to run it as a service)."""

"""GPU and container metrics: what the server samples from every host (hostcmd: the command lines;
parse: their outputs, typed as gpufleet.models.metrics)."""

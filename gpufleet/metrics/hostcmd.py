"""The vendor tools' command lines a metrics sample runs on a host (argv without the tool's name).

One home: the sampler's host script runs these, and the lab's stand-in tools (gpufleet.lab.gputools)
answer exactly these, so a test keeps the two in step. Fields are named as the real tools name them.
"""

from __future__ import annotations

# nvidia-smi: per GPU now, with the health fields (retired/remapped pages, uncorrected ECC, the
# driver's recovery action). Drivers older than the health fields refuse the whole query ("is not a
# valid field to query"): NVIDIA_GPUS_BASIC is then asked instead.
NVIDIA_GPU_FIELDS = ("index", "uuid", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu",
                     "power.draw", "ecc.errors.uncorrected.volatile.total", "retired_pages.pending",
                     "remapped_rows.pending", "remapped_rows.failure", "gpu_recovery_action")
NVIDIA_GPUS = (f"--query-gpu={','.join(NVIDIA_GPU_FIELDS)}", "--format=csv,noheader,nounits")
NVIDIA_GPUS_BASIC = (f"--query-gpu={','.join(NVIDIA_GPU_FIELDS[:7])}", "--format=csv,noheader,nounits")
# the processes holding a GPU (host PIDs); process_name last: it is a path that may hold a comma
NVIDIA_APPS = ("--query-compute-apps=gpu_uuid,pid,used_memory,process_name", "--format=csv,noheader,nounits")

# amd-smi (ROCm 6.1+): utilization, memory, temperature, power, ECC per GPU; processes per GPU
AMD_METRIC = ("metric", "--json")
AMD_PROCESS = ("process", "--json")

# hl-smi: the fields of a recorded Gaudi 3 query (../shared/fixtures/gpu-tools/hl-smi_query_2xGaudi3_*.csv)
HLSMI_FIELDS = ("index", "uuid", "name", "driver_version", "memory.total", "memory.used", "memory.free",
                "power.draw", "power.max", "temperature.aip", "utilization.aip")
HLSMI_METRICS = ("-Q", ",".join(HLSMI_FIELDS), "-f", "csv,noheader")

# tt-smi: the same snapshot the probe reads (telemetry: power, ASIC temperature; no utilization)
TTSMI_SNAPSHOT = ("-s",)

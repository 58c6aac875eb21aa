from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.models import GPUSpec, Range
from gpufleet.runconfig import load_run


@pytest.mark.parametrize("spec,count,names,vendor,memory", [
    (4, Range(4, 4), None, None, None),
    ("2..4", Range(2, 4), None, None, None),
    ("H100:4", Range(4, 4), ["H100"], None, None),
    ("H100:80GB:4", Range(4, 4), ["H100"], None, Range(80, None)),
    ("A100,H100:2", Range(2, 2), ["A100", "H100"], None, None),
    ("amd:2", Range(2, 2), None, "amd", None),
    ("gaudi:MI-ignored:1", Range(1, 1), ["MI-ignored"], "intel", None),
    ("24GB..:1", Range(1, 1), None, None, Range(24, None)),
    ({"name": "H100", "count": "1..2", "memory": "40GB..80GB"}, Range(1, 2), ["H100"], None, Range(40, 80)),
])
def test_gpu_specs(spec, count, names, vendor, memory):
    g = GPUSpec.model_validate(spec)
    assert (g.count, g.name, g.vendor, g.memory) == (count, names, vendor, memory)


def test_task_loads_and_bad_run_configs_point_at_the_field(tmp_path: Path):
    good = tmp_path / "train.yml"
    good.write_text("type: task\nimage: localhost/gpufleet-lab:latest\ncommands: [echo hi]\n"
                    "env: {A: '1'}\nresources: {gpu: H100:4}\n")
    run = load_run(good)
    assert run.name == "train" and run.config.resources.gpu.count == Range(4, 4)
    bad = tmp_path / "bad.yml"
    bad.write_text("type: task\nimage: '-v /:/host'\nresources:\n  gpu: H100:x!:4\nvolumes: [relative:/x]\n")
    with pytest.raises(ConfigError) as e:
        load_run(bad)
    text = "\n".join(map(str, e.value.problems))
    assert f"{bad}:2:8: image:" in text
    assert f"{bad}:4:8: resources.gpu:" in text
    assert f"{bad}:5:10: volumes:" in text
    unknown = tmp_path / "u.yml"
    unknown.write_text("type: job\nimage: x\n")
    with pytest.raises(ConfigError, match="type must be task, service or dev-environment"):
        load_run(unknown)

"""Which hop of a jump chain a connection failed at, as messages name it."""

from __future__ import annotations

from pathlib import Path

from test_inventory import fleet_file

from gpufleet.config import load_fleet
from gpufleet.inventory import write_fleet_files
from gpufleet.probe import HopPlace, hop_places


def test_each_hop_knows_its_place_in_its_chain(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    files = write_fleet_files(load_fleet(fleet_file(tmp_path)))
    places = hop_places(files)
    # jump0: the one login node of node-1/node-2; jump1 -> jump2: deep's gateway, then its login node
    assert places == {"lambda-jump0": HopPlace(1, 1), "lambda-jump1": HopPlace(1, 2), "lambda-jump2": HopPlace(2, 2)}
    by_alias = {e.alias: e for e in files.plan.jumps}
    assert places["lambda-jump0"].name(by_alias["lambda-jump0"]) == "login node 203.0.113.5:22"
    assert places["lambda-jump1"].name(by_alias["lambda-jump1"]) == "gateway gw.example:22 (hop 1 of 2)"
    assert places["lambda-jump2"].name(by_alias["lambda-jump2"]) == "login node 203.0.113.5:22 (hop 2 of 2)"
    assert "ssh_config.proxy_jump (" in places["lambda-jump0"].settings()
    assert "ssh_config.proxy_jump[0]" in places["lambda-jump1"].settings()

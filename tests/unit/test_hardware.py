"""The hardware probe describes this machine and never fails."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import onnxruntime as ort

from edge_models.hardware import GpuInfo, cpu_model, nvidia_gpus, parse_nvidia_smi, probe


def test_probe_reports_this_machine() -> None:
    info = probe()
    assert info.cpu_cores >= 1
    assert info.ram_bytes > 0
    assert info.cpu_model
    assert "CPUExecutionProvider" in info.providers
    assert info.providers == tuple(ort.get_available_providers())
    devices = info.devices()
    assert devices[0] == {"kind": "cpu", "name": info.cpu_model, "memory": info.ram_bytes}
    assert len(devices) == 1 + len(info.gpus)
    assert all(d["kind"] == "gpu" for d in devices[1:])


def test_to_dict_is_json() -> None:
    d = probe().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"cpu_model", "cpu_cores", "ram_bytes", "providers", "gpus", "devices"}


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559\nTesla T4, 15360\ngarbage\n, 12\nX, notanumber\n"
    assert parse_nvidia_smi(text) == (
        GpuInfo("NVIDIA H100 80GB HBM3", 81559 * 1024 * 1024),
        GpuInfo("Tesla T4", 15360 * 1024 * 1024),
    )
    assert parse_nvidia_smi("") == ()


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_nvidia_smi_fake_tool(tmp_path: Path) -> None:
    smi = _script(tmp_path, 'echo "Fake GPU, 1024"')
    assert nvidia_gpus(smi) == (GpuInfo("Fake GPU", 1024 * 1024 * 1024),)


def test_nvidia_smi_failure_is_empty(tmp_path: Path) -> None:
    assert nvidia_gpus(_script(tmp_path, "exit 9")) == ()
    assert nvidia_gpus(str(tmp_path / "missing")) == ()


def test_cpu_model_fallbacks(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    assert cpu_model(f) == "Test CPU 9000"
    assert cpu_model(tmp_path / "nope")  # falls back to platform, never empty

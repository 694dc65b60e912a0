"""What this machine can run models on: CPU, RAM, GPUs and ONNX Runtime providers.

The probe never fails: a missing tool or unreadable file just means that piece
of hardware is not reported. The result feeds the capability ad's ``devices``
and ``providers`` fields.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import psutil

# nvidia-smi can hang on a wedged driver; the probe must not.
_NVIDIA_SMI_TIMEOUT_S = 3.0
_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    cpu_cores: int
    ram_bytes: int
    providers: tuple[str, ...]
    gpus: tuple[GpuInfo, ...]

    def devices(self) -> list[dict[str, Any]]:
        """Devices in the capability-ad shape: kind, name, memory in bytes."""
        out: list[dict[str, Any]] = [
            {"kind": "cpu", "name": self.cpu_model, "memory": self.ram_bytes}
        ]
        out.extend({"kind": "gpu", "name": g.name, "memory": g.memory_bytes} for g in self.gpus)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_model": self.cpu_model,
            "cpu_cores": self.cpu_cores,
            "ram_bytes": self.ram_bytes,
            "providers": list(self.providers),
            "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes} for g in self.gpus],
            "devices": self.devices(),
        }


def probe() -> HardwareInfo:
    """Describe this machine's compute devices (never raises)."""
    return HardwareInfo(
        cpu_model=cpu_model(),
        cpu_cores=_cpu_cores(),
        ram_bytes=_ram_bytes(),
        providers=_providers(),
        gpus=nvidia_gpus(),
    )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; some ARM kernels only say "Hardware"/"Processor".
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_cores() -> int:
    try:
        n = psutil.cpu_count(logical=True)
    except Exception:  # psutil can fail in odd containers; the probe must not
        n = None
    return int(n or os.cpu_count() or 1)


def _ram_bytes() -> int:
    try:
        return int(psutil.virtual_memory().total)
    except Exception:
        return 0


def _providers() -> tuple[str, ...]:
    try:
        return tuple(ort.get_available_providers())
    except Exception:
        return ("CPUExecutionProvider",)


def nvidia_gpus(smi: str | None = None) -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs via nvidia-smi; empty when it is missing, fails or times out."""
    exe = smi or shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if proc.returncode != 0:
        return ()
    return parse_nvidia_smi(proc.stdout)


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """Parse ``name, memory MiB`` lines; malformed lines are skipped."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        name, sep, mem = line.rpartition(",")
        if not sep or not name.strip():
            continue
        try:
            mib = int(float(mem.strip()))
        except ValueError:
            continue
        gpus.append(GpuInfo(name=name.strip(), memory_bytes=mib * _MIB))
    return tuple(gpus)

"""Which machine a number came from: CPU model and cores, accelerator, library versions."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = ["current_load", "describe_device", "device_label"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def current_load() -> float | None:
    """The 1-minute load average now (None where the OS does not say)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def describe_device(torch_device: str = "cpu") -> dict[str, Any]:
    """A JSON-ready description of this machine and the torch device the pipelines use."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": _cpus(),
        "platform": platform.platform(terse=True),
        "python": sys.version.split()[0],
        "torch_device": torch_device,
        "accelerator": None,
        "load_start": current_load(),
    }
    if torch_device.startswith("cuda"):
        try:
            import torch  # the pipelines need it on this device anyway

            if torch.cuda.is_available():
                info["accelerator"] = torch.cuda.get_device_name(torch.device(torch_device))
            else:
                info["accelerator_missing"] = True
        except Exception:  # a label must never fail a run
            info["accelerator_missing"] = True
    try:
        import importlib.metadata as md

        info["torch"] = md.version("torch")
    except Exception:
        info["torch"] = None
    return info


def device_label(info: dict[str, Any]) -> str:
    """One line naming the device, for every table and plot."""
    acc = info.get("accelerator")
    if acc:
        where = f"{acc} ({info['torch_device']})"
    elif info.get("accelerator_missing"):
        where = f"asked for {info['torch_device']} but no CUDA device was found"
    else:
        where = f"CPU only ({info['torch_device']})"
    return f"{info['cpu']}, {info['cpus']} CPUs, {where}"

"""GPU utilisation and memory of a benchmark run, sampled through NVML (``pip install nvidia-ml-py``).

NVML's utilisation is the share of its last sample period in which at least one kernel ran
on the device; a GPU that sits near 100 % while the run's CPUs wait is the bottleneck. On a
machine without NVML or without an NVIDIA GPU the sampler records nothing and a run's
``gpu`` figures are ``None``.
"""
from __future__ import annotations

import statistics
import threading
from typing import Any, Optional, Sequence

# Below this a sample counts as idle: NVML reports a few percent for an idle context.
IDLE_PERCENT = 5.0
# The bar: the GPU is not the bottleneck while its active-window utilisation stays under this.
BOTTLENECK_PERCENT = 90.0


class GpuSampler(threading.Thread):
    """Samples every visible NVIDIA GPU until stopped: mean utilisation (%) and memory used (MB) in total."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self._every_s = every_s
        self._stop_event = threading.Event()
        self.device_name: Optional[str] = None
        self.utilisation: list[float] = []
        self.memory_mb: list[float] = []
        self._nvml = _nvml()
        self._handles = []
        if self._nvml is not None:
            nvml = self._nvml
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if self._handles:
                name = nvml.nvmlDeviceGetName(self._handles[0])
                count = f"{len(self._handles)} x " if len(self._handles) > 1 else ""
                self.device_name = count + (name.decode() if isinstance(name, bytes) else name)

    def run(self) -> None:
        while self._handles and not self._stop_event.wait(self._every_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def sample(self) -> None:
        nvml = self._nvml
        rates = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
        used = [nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles]
        self.utilisation.append(sum(rates) / len(rates))
        self.memory_mb.append(sum(used) / 2**20)

    def summary(self) -> Optional[dict[str, Any]]:
        if not self.utilisation:
            return None
        return dict(gpu=self.device_name, every_s=self._every_s, **gpu_summary(self.utilisation, self.memory_mb))


def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None where there is no NVML or no NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def gpu_summary(utilisation: Sequence[float], memory_mb: Sequence[float]) -> dict[str, Any]:
    """A run's GPU figures from its samples.

    The active window runs from the first to the last sample above ``IDLE_PERCENT``: before it
    the run is starting (interpreters, models), after it writing its last files, and neither is
    the GPU's doing. Within the window, ``idle_share`` is how often the GPU had nothing to run.
    """
    active = [i for i, u in enumerate(utilisation) if u > IDLE_PERCENT]
    window = list(utilisation[active[0] : active[-1] + 1]) if active else []
    return {
        "samples": len(utilisation),
        "util_mean": statistics.fmean(utilisation),
        "util_max": max(utilisation),
        "active_samples": len(window),
        "util_mean_active": statistics.fmean(window) if window else 0.0,
        "idle_share_active": sum(u <= IDLE_PERCENT for u in window) / len(window) if window else None,
        "memory_peak_mb": max(memory_mb),
    }

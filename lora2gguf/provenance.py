"""What a report must say about where and with what it was measured."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Any

# Bumped when a report's fields change meaning; every report shares it.
SCHEMA_VERSION = 1

_PACKAGES = (
    "lora2gguf",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "tokenizers",
    "gguf",
    "numpy",
    "llama_cpp_python",
    "snakemake",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported); absent packages map to None."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | None = None) -> dict[str, Any]:
    """Describe the host, and the torch device when torch is already loaded."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    torch = sys.modules.get("torch")
    if torch is not None and device is not None and str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


_NO_DEVICE = object()


def build_report(kind: str, body: dict[str, Any], device: Any = _NO_DEVICE) -> dict[str, Any]:
    """The one shape of every JSON report: ``schema`` (``lora2gguf/<kind>/1``) first, then the
    step's own fields, then ``versions`` and, when the step ran on a device, ``device``."""
    report: dict[str, Any] = {"schema": f"lora2gguf/{kind}/{SCHEMA_VERSION}", **body}
    report["versions"] = package_versions()
    if device is not _NO_DEVICE:
        report["device"] = device_info(device)
    return report


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms).

    ``ru_maxrss`` alone is the peak over the whole process life, which hides a step's own
    peak behind whatever ran before it, so a sampling thread measures the window itself.
    """

    def __init__(self, interval_s: float = 0.01, cuda: bool | None = None) -> None:
        self.interval_s = interval_s
        self._cuda = cuda
        self.start_rss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss_mb = max(self.peak_rss_mb, _current_rss_mb())

    def _cuda_active(self) -> bool:
        torch = sys.modules.get("torch")
        if self._cuda is False or torch is None:
            return False
        return bool(torch.cuda.is_available())

    def __enter__(self) -> PeakMemory:
        self.start_rss_mb = self.peak_rss_mb = _current_rss_mb()
        if self._cuda_active():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, _current_rss_mb())
        if self._cuda_active():
            import torch

            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict[str, float | None]:
        return {
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_at_start_mb": round(self.start_rss_mb, 1),
            "cuda_peak_allocated_mb": None if self.cuda_peak_mb is None else round(self.cuda_peak_mb, 1),
        }


class Timer:
    """Wall-clock seconds spent in a block (monotonic clock)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start

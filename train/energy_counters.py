"""Energy counters: cumulative joules since `start()`, each labelled with how it knows them.

    measured:nvml   NVIDIA total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ, Volta and newer)
    measured:rapl   Linux powercap RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj)
    estimated:tdp   nameplate power x utilisation: watts per core x this process's CPU seconds
                    (= nameplate x CPU time / (wall x cores) x wall), or accelerator watts x devices x wall
    codecarbon      CodeCarbon's OfflineEmissionsTracker (its own RAPL / TDP / NVML choice; never the network)

Optional libraries (nvidia-ml-py, codecarbon) are imported lazily; a counter that cannot run raises
`Unavailable` from its constructor, so `energy.py` falls back to the next one.
"""

import glob
import os
import time
from typing import Callable


class Unavailable(RuntimeError):
  """This counter cannot measure on this machine (no library, no device, unreadable files)."""


class NvmlCounter:
  """Sum over the given NVIDIA GPUs of the NVML total-energy counter (millijoules since driver load)."""

  method = "measured:nvml"

  def __init__(self, device_indices: list[int] | None = None, nvml=None):
    if nvml is None:
      try:
        import pynvml as nvml  # nvidia-ml-py  # pylint: disable=import-outside-toplevel
      except ImportError as error:
        raise Unavailable("nvidia-ml-py is not installed (pip install 'sparseformer[energy]')") from error
    self._nvml = nvml
    try:
      nvml.nvmlInit()
      count = nvml.nvmlDeviceGetCount()
      indices = range(count) if device_indices is None else device_indices
      self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
      if not self._handles:
        raise Unavailable("NVML sees no GPU")
      self._start = self._read_mj()
    except Unavailable:
      raise
    except Exception as error:  # NVMLError and friends: no driver, no permission, unsupported GPU
      raise Unavailable(f"NVML: {error}") from error

  def _read_mj(self) -> int:
    return sum(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles)

  def joules(self) -> float:
    return (self._read_mj() - self._start) / 1e3

  def close(self) -> None:
    try:
      self._nvml.nvmlShutdown()
    except Exception:  # pylint: disable=broad-except
      pass


class RaplCounter:
  """Sum over the RAPL package zones (intel-rapl:N, not their sub-zones, which they already contain).

  Each zone's energy_uj wraps to 0 after max_energy_range_uj; a reading below the previous one adds the range.
  Read it at least once per wrap period (minutes at full load: every logged step does) to miss no wrap.
  """

  method = "measured:rapl"

  def __init__(self, root: str = "/sys/class/powercap"):
    self._zones = sorted(path for path in glob.glob(os.path.join(root, "intel-rapl:*"))
                         if os.path.basename(path).count(":") == 1)
    if not self._zones:
      raise Unavailable(f"no RAPL package zone under {root}")
    try:
      self._ranges = [int(_read(os.path.join(zone, "max_energy_range_uj"))) for zone in self._zones]
      self._last = [int(_read(os.path.join(zone, "energy_uj"))) for zone in self._zones]
    except (OSError, ValueError) as error:  # permission denied is the usual case (non-root since 2020)
      raise Unavailable(f"RAPL not readable: {error}") from error
    self._total_uj = 0

  def joules(self) -> float:
    for i, zone in enumerate(self._zones):
      now = int(_read(os.path.join(zone, "energy_uj")))
      delta = now - self._last[i]
      self._total_uj += delta if delta >= 0 else delta + self._ranges[i]
      self._last[i] = now
    return self._total_uj / 1e6

  def close(self) -> None:
    pass


class TdpEstimate:
  """Estimated joules: cpu_watts_per_core x this process's CPU seconds (user + system, every thread), plus
  accelerator_watts x devices x wall seconds for accelerators without an energy counter (TPU, others)."""

  method = "estimated:tdp"

  def __init__(self, cpu_watts_per_core: float, accelerator_watts: float = 0.0, accelerators: int = 0,
               cpu_seconds: Callable[[], float] = time.process_time, wall: Callable[[], float] = time.monotonic):
    self._cpu_watts, self._accel_watts, self._accelerators = cpu_watts_per_core, accelerator_watts, accelerators
    self._cpu_seconds, self._wall = cpu_seconds, wall
    self._cpu_start, self._wall_start = cpu_seconds(), wall()

  def joules(self) -> float:
    cpu = self._cpu_seconds() - self._cpu_start
    wall = self._wall() - self._wall_start
    return self._cpu_watts * cpu + self._accel_watts * self._accelerators * wall

  def close(self) -> None:
    pass


class CodeCarbonCounter:
  """CodeCarbon's OfflineEmissionsTracker (offline: the country is given, nothing is looked up); its energy is
  known only at `stop()`, so `joules()` is None until then."""

  method = "codecarbon"

  def __init__(self, country_iso_code: str, output_dir: str | None = None, tracker_class=None):
    if tracker_class is None:
      try:
        from codecarbon import OfflineEmissionsTracker as tracker_class  # pylint: disable=import-outside-toplevel
      except ImportError as error:
        raise Unavailable("codecarbon is not installed (pip install 'sparseformer[energy]')") from error
    try:
      # CodeCarbon's own PUE stays at its default 1.0: energy.py applies train.energy.pue to every figure alike.
      self._tracker = tracker_class(country_iso_code=country_iso_code, save_to_file=output_dir is not None,
                                    output_dir=output_dir or ".", log_level="error")
      self._tracker.start()
    except Exception as error:  # pylint: disable=broad-except
      raise Unavailable(f"codecarbon: {error}") from error
    self._kwh = None

  def joules(self) -> float | None:
    return None if self._kwh is None else self._kwh * 3.6e6

  def stop(self) -> None:
    if self._kwh is None:
      self._tracker.stop()
      self._kwh = float(self._tracker.final_emissions_data.energy_consumed)

  def close(self) -> None:
    self.stop()


def _read(path: str) -> str:
  with open(path, encoding="ascii") as file:
    return file.read().strip()

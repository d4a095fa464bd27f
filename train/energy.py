"""Energy and CO2e of a run (`train.energy.*`): measured where the hardware counts joules, estimated otherwise.

The figure `energy/joules` is the hardware's (or the estimate's), labelled `energy/method`; the facility energy
multiplies it by the PUE, and CO2e = facility kWh x grid intensity (Patterson et al. 2021, arXiv:2104.10350,
Eq. 1-2: MWh = hours x processors x power x PUE; tCO2e = MWh x tCO2e/MWh). Method order: NVML on NVIDIA GPUs,
then RAPL, then the nameplate estimate (energy_counters.py). CodeCarbon's offline tracker, when installed, runs
beside it and reports its own figure (`energy/codecarbon_joules`) at the end. Estimates are +-40 % at best
(Fischer 2025, arXiv:2509.22092, CodeCarbon against a meter); compare runs on one machine, not across machines.
"""

import dataclasses

from sparseformer.train import energy_counters as counters

METHODS = ("auto", "nvml", "rapl", "tdp", "off")


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
  """Defaults and their sources: docs/compression.md, "Energy"."""

  method: str = "auto"  # auto (nvml on NVIDIA GPUs, else rapl, else tdp) | nvml | rapl | tdp | off
  pue: float = 1.0  # power usage effectiveness of the facility (CodeCarbon's default; Patterson et al. use 1.1)
  grid_gco2_per_kwh: float = 475.0  # grid intensity; 475 = CodeCarbon's world average (Our World in Data)
  cpu_watts_per_core: float = 4.0  # nameplate per logical core for the estimate (CodeCarbon's unknown-CPU default)
  accelerator_watts: float = 0.0  # nameplate per accelerator without a counter (e.g. TPU); 0 = not counted
  codecarbon: bool = True  # also run CodeCarbon's OfflineEmissionsTracker when it is installed (never online)
  codecarbon_country: str = "USA"  # ISO-3166 alpha-3 country for CodeCarbon's offline grid intensity

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"train.energy.method={self.method!r} is not one of {', '.join(METHODS)}.")
    if not self.pue >= 1.0:
      raise ValueError(f"train.energy.pue must be >= 1 (facility / IT energy), got {self.pue}.")
    for name in ("grid_gco2_per_kwh", "cpu_watts_per_core", "accelerator_watts"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"train.energy.{name} must be >= 0, got {getattr(self, name)}.")
    if len(self.codecarbon_country) != 3 or not self.codecarbon_country.isalpha():
      raise ValueError(f"train.energy.codecarbon_country={self.codecarbon_country!r}: give an ISO-3166 alpha-3 "
                       "code such as 'USA', 'FRA' or 'DEU'.")


def co2e_grams(joules: float, config: EnergyConfig) -> float:
  """grams CO2e of `joules` of hardware energy: joules x PUE / 3.6e6 J/kWh x grid g/kWh."""
  return joules * config.pue / 3.6e6 * config.grid_gco2_per_kwh


def figures(joules: float, method: str, config: EnergyConfig, *, tokens: int | None = None,
            prefix: str = "energy/") -> dict:
  """The metrics of one energy reading: joules, kWh, facility kWh (x PUE), CO2e grams, method, J per token."""
  out = {f"{prefix}joules": joules, f"{prefix}kwh": joules / 3.6e6,
         f"{prefix}facility_kwh": joules * config.pue / 3.6e6, f"{prefix}co2e_g": co2e_grams(joules, config),
         f"{prefix}method": method}
  if tokens:
    out[f"{prefix}joules_per_token"] = joules / tokens
  return out


def _primary_counter(config: EnergyConfig, backend: str, accelerators: int):
  """The first counter of the method order that works here, or the one asked for (Unavailable if it cannot)."""
  estimate = lambda: counters.TdpEstimate(  # noqa: E731
      config.cpu_watts_per_core, config.accelerator_watts, 0 if backend == "cpu" else accelerators)
  if config.method == "nvml":
    return counters.NvmlCounter()
  if config.method == "rapl":
    return counters.RaplCounter()
  if config.method == "tdp":
    return estimate()
  order = ([counters.NvmlCounter] if backend == "gpu" else []) + [counters.RaplCounter]
  for make in order:
    try:
      return make()
    except counters.Unavailable:
      continue
  return estimate()


class EnergyMeter:
  """Cumulative energy of this process's run since construction; `read()` at every logged step (so RAPL
  wrap-around is seen), `summary()` once at the end. Only the host of this process is counted."""

  def __init__(self, config: EnergyConfig, *, backend: str = "cpu", accelerators: int = 0, primary=None,
               codecarbon=None):
    self.config = config
    self.enabled = config.method != "off"
    self._primary = primary
    self._codecarbon = codecarbon
    if not self.enabled:
      return
    if self._primary is None:
      try:
        self._primary = _primary_counter(config, backend, accelerators)
      except counters.Unavailable as error:
        raise ValueError(f"train.energy.method={config.method!r} cannot measure here ({error}); use "
                         "train.energy.method=auto.") from error
    if self._codecarbon is None and config.codecarbon:
      try:
        self._codecarbon = counters.CodeCarbonCounter(config.codecarbon_country)
      except counters.Unavailable:
        self._codecarbon = None

  @property
  def method(self) -> str:
    return self._primary.method if self.enabled else "off"

  def read(self, tokens: int | None = None) -> dict:
    """energy/* metrics so far ({} when off)."""
    if not self.enabled:
      return {}
    return figures(self._primary.joules(), self._primary.method, self.config, tokens=tokens)

  def summary(self, tokens: int | None = None) -> dict:
    """The final figures, CodeCarbon's beside them (energy/codecarbon_*) when it ran; stops every counter."""
    if not self.enabled:
      return {}
    out = self.read(tokens)
    if self._codecarbon is not None:
      self._codecarbon.stop()
      out.update(figures(self._codecarbon.joules(), "codecarbon", self.config, tokens=tokens,
                         prefix="energy/codecarbon_"))
    self.close()
    return out

  def close(self) -> None:
    for counter in (self._primary, self._codecarbon):
      if counter is not None:
        counter.close()


def describe(summary: dict) -> str:
  """'1,234 J (measured:rapl), 0.06 g CO2e, 2.1e-03 J/token' for the final log line."""
  if "energy/joules" not in summary:
    return "energy not tracked (train.energy.method=off)"
  text = (f"{summary['energy/joules']:,.0f} J ({summary['energy/method']}), {summary['energy/co2e_g']:.3g} g CO2e")
  if "energy/joules_per_token" in summary:
    text += f", {summary['energy/joules_per_token']:.3g} J/token"
  if "energy/codecarbon_joules" in summary:
    text += f"; CodeCarbon {summary['energy/codecarbon_joules']:,.0f} J"
  return text

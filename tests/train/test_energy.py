"""train/energy.py and train/energy_counters.py: arithmetic and method labels with faked counters."""

import os
import types

import pytest

from sparseformer.train import energy
from sparseformer.train import energy_counters as counters


def _write(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="ascii") as file:
    file.write(f"{value}\n")


def test_rapl_sums_package_zones_and_handles_wrap_around(tmp_path):
  root = str(tmp_path)
  for zone, start, max_range in (("intel-rapl:0", 900, 1000), ("intel-rapl:1", 5, 10_000)):
    _write(f"{root}/{zone}/energy_uj", start)
    _write(f"{root}/{zone}/max_energy_range_uj", max_range)
  _write(f"{root}/intel-rapl:0:0/energy_uj", 123)  # a sub-zone (core): inside its package, never added
  _write(f"{root}/intel-rapl:0:0/max_energy_range_uj", 1000)
  counter = counters.RaplCounter(root)
  _write(f"{root}/intel-rapl:0/energy_uj", 100)  # wrapped: 900 -> 1000 = 0 -> 100 is 200 uJ
  _write(f"{root}/intel-rapl:1/energy_uj", 25)  # +20 uJ
  _write(f"{root}/intel-rapl:0:0/energy_uj", 999_999)
  assert counter.joules() == pytest.approx(220e-6)
  _write(f"{root}/intel-rapl:0/energy_uj", 700)  # +600, no wrap
  assert counter.joules() == pytest.approx(820e-6)
  assert counter.method == "measured:rapl"
  with pytest.raises(counters.Unavailable, match="no RAPL package zone"):
    counters.RaplCounter(str(tmp_path / "absent"))


def test_rapl_permission_denied_is_unavailable(tmp_path, monkeypatch):
  _write(f"{tmp_path}/intel-rapl:0/energy_uj", 1)
  _write(f"{tmp_path}/intel-rapl:0/max_energy_range_uj", 10)

  def denied(path):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(counters, "_read", denied)
  with pytest.raises(counters.Unavailable, match="RAPL not readable"):
    counters.RaplCounter(str(tmp_path))


def _fake_nvml(readings_mj):
  """An nvidia-ml-py stand-in: GPU i's counter returns the next value of readings_mj[i] at each call."""
  iters = [iter(values) for values in readings_mj]
  return types.SimpleNamespace(
      nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(iters),
      nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetTotalEnergyConsumption=lambda h: next(iters[h]))


def test_nvml_sums_gpus_in_millijoules():
  counter = counters.NvmlCounter(nvml=_fake_nvml([[1_000, 6_000], [50_000, 52_500]]))
  assert counter.joules() == pytest.approx(7.5)  # (5000 + 2500) mJ
  assert counter.method == "measured:nvml"
  meter = energy.EnergyMeter(energy.EnergyConfig(), primary=counters.NvmlCounter(
      nvml=_fake_nvml([[0, 3_600_000]])), codecarbon=None)
  figures = meter.read(tokens=1000)
  assert figures["energy/method"] == "measured:nvml" and figures["energy/joules"] == pytest.approx(3600.0)
  assert figures["energy/joules_per_token"] == pytest.approx(3.6)


def test_tdp_estimate_is_nameplate_per_core_times_cpu_seconds_plus_accelerators():
  clock = {"cpu": 10.0, "wall": 100.0}
  estimate = counters.TdpEstimate(4.0, accelerator_watts=200.0, accelerators=2, cpu_seconds=lambda: clock["cpu"],
                                  wall=lambda: clock["wall"])
  clock.update(cpu=70.0, wall=130.0)  # 60 CPU s over 30 wall s: 2 cores busy
  # 4 W/core x (60 s / (30 s x 2 cores)) utilisation x 2 cores x 30 s = 240 J; accelerators 2 x 200 W x 30 s.
  assert estimate.joules() == pytest.approx(240.0 + 12_000.0)
  assert estimate.method == "estimated:tdp"


def test_co2e_pue_grid_arithmetic_and_summary_with_codecarbon():
  config = energy.EnergyConfig(pue=1.5, grid_gco2_per_kwh=400.0, cpu_watts_per_core=4.0)
  clock = {"cpu": 0.0}
  primary = counters.TdpEstimate(4.0, cpu_seconds=lambda: clock["cpu"], wall=lambda: 0.0)

  class FakeTracker:
    def __init__(self, **kwargs):
      assert kwargs["country_iso_code"] == "USA"  # offline: the country is given, never looked up
      self.final_emissions_data = None

    def start(self):
      pass

    def stop(self):
      self.final_emissions_data = types.SimpleNamespace(energy_consumed=0.002)  # kWh

  meter = energy.EnergyMeter(config, primary=primary,
                             codecarbon=counters.CodeCarbonCounter("USA", tracker_class=FakeTracker))
  clock["cpu"] = 900.0  # 3,600 J
  summary = meter.summary(tokens=36_000)
  assert summary["energy/method"] == "estimated:tdp"
  assert summary["energy/joules"] == pytest.approx(3600.0)
  assert summary["energy/kwh"] == pytest.approx(0.001)
  assert summary["energy/facility_kwh"] == pytest.approx(0.0015)
  assert summary["energy/co2e_g"] == pytest.approx(0.6)  # 0.001 kWh x 1.5 x 400 g/kWh
  assert summary["energy/joules_per_token"] == pytest.approx(0.1)
  assert summary["energy/codecarbon_method"] == "codecarbon"
  assert summary["energy/codecarbon_joules"] == pytest.approx(7200.0)
  assert "3,600 J (estimated:tdp)" in energy.describe(summary)


def test_auto_picks_rapl_then_tdp_and_a_forced_method_that_cannot_run_is_an_error(monkeypatch, tmp_path):
  monkeypatch.setattr(counters.RaplCounter.__init__, "__defaults__", (str(tmp_path / "none"),))
  monkeypatch.setattr(counters, "CodeCarbonCounter", lambda *a, **k: (_ for _ in ()).throw(counters.Unavailable()))
  assert energy.EnergyMeter(energy.EnergyConfig(), backend="cpu").method == "estimated:tdp"
  _write(f"{tmp_path}/none/intel-rapl:0/energy_uj", 5)
  _write(f"{tmp_path}/none/intel-rapl:0/max_energy_range_uj", 10)
  assert energy.EnergyMeter(energy.EnergyConfig(), backend="cpu").method == "measured:rapl"
  with pytest.raises(ValueError, match=r"train.energy.method='nvml' cannot measure here .*method=auto"):
    energy.EnergyMeter(energy.EnergyConfig(method="nvml"), backend="cpu")
  assert energy.EnergyMeter(energy.EnergyConfig(method="off")).read() == {}


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"train.energy.method='joulemeter' is not one of"):
    energy.EnergyConfig(method="joulemeter")
  with pytest.raises(ValueError, match=r"train.energy.pue must be >= 1"):
    energy.EnergyConfig(pue=0.9)
  with pytest.raises(ValueError, match=r"train.energy.grid_gco2_per_kwh must be >= 0"):
    energy.EnergyConfig(grid_gco2_per_kwh=-1.0)
  with pytest.raises(ValueError, match=r"train.energy.codecarbon_country='France': give an ISO-3166 alpha-3"):
    energy.EnergyConfig(codecarbon_country="France")

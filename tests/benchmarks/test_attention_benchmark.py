"""benchmarks/attention.py plumbing: warm-up discarded, >= 3 interleaved samples, strongest baselines, honest bound."""

import pytest

from sparseformer.benchmarks import attention as bench


class _FakeEntry:
  def __init__(self, name, calls):
    self.name, self.times, self.calls = name, [], calls

  def run(self):
    self.calls.append(self.name)
    self.times.append(1.0)
    return 1.0


def test_time_interleaved_discards_warmup_and_alternates():
  calls = []
  entries = [_FakeEntry(name, calls) for name in "abc"]
  bench.time_interleaved(entries, repeats=3)
  assert calls == list("abc") + list("abc") + list("cba") + list("abc")  # warm-up, then alternating rounds
  assert all(len(entry.times) == 3 for entry in entries)  # the warm-up call is not a sample
  with pytest.raises(ValueError, match="at least 3"):
    bench.time_interleaved(entries, repeats=2)


def test_run_times_pattern_and_both_dense_causal_baselines():
  rows = bench.run([256], ["local"], repeats=3, dense_max_gib=10.0, log=lambda *_: None)
  names = {(row["pattern"], row["impl"], row["mode"]) for row in rows}
  for mode in ("fwd", "fwd+bwd"):
    assert {("baseline", "blocked_causal", mode), ("baseline", "xla_dense_causal", mode), ("local", "xla", mode),
            ("local", "masked_dense", mode)} <= names
  assert all(row["runs"] == 3 for row in rows)
  assert "| local | 256 |" in bench._table(rows)  # pylint: disable=protected-access


def test_table_bound_is_causal_density_over_token_density_and_uses_the_fastest_baseline():
  facts = dict(seq=8192, causal_token_density=0.5, token_density=0.0625, density=0.0757, layout="w")
  rows = [dict(facts, pattern="local", impl="xla", mode=mode, seconds=1.0, peak_mb=1.0) for mode in ("fwd", "fwd+bwd")]
  rows += [dict(facts, pattern="baseline", impl=impl, mode=mode, seconds=seconds, peak_mb=1.0)
           for mode in ("fwd", "fwd+bwd") for impl, seconds in (("blocked_causal", 7.2), ("xla_dense_causal", 9.0))]
  line = bench._table(rows).splitlines()[-1]  # pylint: disable=protected-access
  # bound 0.5 / 0.0625 = 8x; speedup against the faster baseline (7.2 s), not the slower one: 7.2x = 90 %
  assert "| 8.0x |" in line and "7.2x (90 %)" in line and "9.0x" not in line

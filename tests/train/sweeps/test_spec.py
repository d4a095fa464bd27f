"""train/sweeps/spec.py: SWEEP -> runs (order, names, overrides, zipped axes, --set restriction) and its errors."""

import itertools

import pytest
from sweep_helpers import write_study

from sparseformer import experiments
from sparseformer.models.config import ModelConfig
from sparseformer.train import overrides
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.sweeps import spec, store

BASE = RunConfig(name="base", model=ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=64),
                 data=DataConfig(seq_len=32, batch_size=4), train=TrainConfig(steps=3, learning_rate=3e-3, seed=5))
VARIANTS = {"global": [], "local": ["model.attention_pattern=('local',)", "model.attention.window=16"]}
ZIPPED = ("data.seq_len", "model.max_seq_len")
SWEEP = dict(variants=VARIANTS, grid={"model.d_model": [32, 64], ZIPPED: [(32, 32), (64, 64), (128, 128)]},
             learning_rates=[1e-3, 4.6e-4], seeds=[0, 1], select="eval/example_accuracy", compare_at="tokens")


def _expand(sweep=None, cli=(), **selection):
  return spec.expand("study", BASE, SWEEP if sweep is None else sweep, list(cli), **selection)


def test_expansion_is_the_product_in_a_stable_order_with_each_runs_overrides():
  plan = _expand()
  assert len(plan.runs) == 2 * 2 * 3 * 2 * 2
  expected = itertools.product(VARIANTS, [32, 64], [(32, 32), (64, 64), (128, 128)], [1e-3, 4.6e-4], [0, 1])
  for run, (variant, width, (seq_len, max_len), lr, seed) in zip(plan.runs, expected, strict=True):
    assert (run.variant, run.learning_rate, run.seed) == (variant, lr, seed)
    assert run.grid == {"model.d_model": width, "data.seq_len": seq_len, "model.max_seq_len": max_len}
    assert list(run.overrides) == VARIANTS[variant] + [
        f"model.d_model={width}", f"data.seq_len={seq_len}", f"model.max_seq_len={max_len}",
        f"train.learning_rate={lr!r}", f"train.seed={seed}", f"data.seed={seed}"]
    config = overrides.apply_overrides(BASE, list(run.overrides))  # the overrides make the run's config
    assert (config.model.d_model, config.data.seq_len, config.model.max_seq_len) == (width, seq_len, max_len)
    assert (config.train.learning_rate, config.train.seed, config.data.seed) == (lr, seed, seed)
  assert plan.swept_fields == ("model.d_model", "data.seq_len", "model.max_seq_len")
  assert (plan.select, plan.select_mode, plan.compare_at) == ("eval/example_accuracy", "max", "tokens")


def test_names_are_readable_filesystem_safe_unique_and_stable():
  plan = _expand()
  names = [run.name for run in plan.runs]
  assert names[0] == "global__d_model=32__seq_len=32,max_seq_len=32__lr=1e-3__seed=0"
  assert names[3] == "global__d_model=32__seq_len=32,max_seq_len=32__lr=4.6e-4__seed=1"
  assert len(set(names)) == len(names)
  assert all("/" not in name and " " not in name and "'" not in name for name in names)
  assert names == [run.name for run in _expand().runs]
  # a tuple value is joined with '+', unsafe characters replaced
  pattern = _expand(dict(grid={"model.attention_pattern": [("local", "global")]}), ["model.attention.window=16"])
  assert pattern.runs[0].name == "base__attention_pattern=local+global__lr=3e-3__seed=5"


def test_a_long_name_is_shortened_deterministically_with_a_hash():
  sweep = dict(grid={"train.sample_prompt": ["x" * 150, "x" * 149 + "y"]})
  first, second = (run.name for run in _expand(sweep).runs)
  assert len(first) == len(second) == spec.MAX_NAME_LENGTH
  assert first[:-12] == second[:-12] and first[-12:-10] == "__" and first[-10:] != second[-10:]
  assert [run.name for run in _expand(sweep).runs] == [first, second]


def test_sweep_json_document_flattens_zipped_keys():
  document = _expand().to_json()
  assert document["format"] == store.FORMAT and document["experiment"] == "study"
  assert document["runs"][0] == {"name": "global__d_model=32__seq_len=32,max_seq_len=32__lr=1e-3__seed=0",
                                 "variant": "global",
                                 "grid": {"model.d_model": 32, "data.seq_len": 32, "model.max_seq_len": 32},
                                 "learning_rate": 1e-3, "seed": 0,
                                 "overrides": list(_expand().runs[0].overrides)}


def test_defaults_one_base_variant_the_configs_learning_rate_and_seed():
  plan = _expand({})
  assert [(run.name, run.variant, run.learning_rate, run.seed) for run in plan.runs] == [
      ("base__lr=3e-3__seed=5", "base", 3e-3, 5)]
  assert (plan.select, plan.select_mode, plan.compare_at, plan.swept_fields) == ("eval/loss", "min", "steps", ())
  assert spec.default_select_mode("eval/bits_per_byte") == "min"
  assert spec.default_select_mode("eval/token_accuracy") == "max"


def test_cli_set_of_a_swept_field_restricts_its_axis_and_other_sets_apply_to_every_run():
  plan = _expand(cli=["model.d_model=64", "data.seq_len=64", "train.steps=7", "train.learning_rate=4.6e-4",
                      "train.seed=1"])
  assert len(plan.runs) == 2
  for run in plan.runs:
    assert run.grid == {"model.d_model": 64, "data.seq_len": 64, "model.max_seq_len": 64}
    assert (run.learning_rate, run.seed) == (4.6e-4, 1)
    assert run.overrides[-1] == "train.steps=7"
    assert sum(item.startswith("model.d_model=") for item in run.overrides) == 1
  assert plan.overrides == ("model.d_model=64", "data.seq_len=64", "train.steps=7", "train.learning_rate=4.6e-4",
                            "train.seed=1")
  assert plan.swept_fields == ()
  # a single-field axis takes a value off the grid too; the zipped one keeps only matching tuples
  assert {run.grid["model.d_model"] for run in _expand(cli=["model.d_model=48"]).runs} == {48}
  with pytest.raises(ValueError, match=r"no point of the zipped grid axis .*data.seq_len=96.*\['128', '32', '64'\]"):
    _expand(cli=["data.seq_len=96"])


def test_variant_seed_and_learning_rate_selection():
  plan = _expand(variants=["local"], seeds=[1], learning_rates=[1e-3])
  assert {(run.variant, run.seed, run.learning_rate) for run in plan.runs} == {("local", 1, 1e-3)}
  assert len(plan.runs) == 6
  with pytest.raises(ValueError, match=r"--variants: \['lokal'\] not in the sweep's \['global', 'local'\]"):
    _expand(variants=["lokal"])
  with pytest.raises(ValueError, match=r"--seeds: \[7\] not in"):
    _expand(seeds=[7])


@pytest.mark.parametrize("sweep,message", [
    (dict(grid={"model.dmodel": [32]}), r"'model.dmodel' is not a config field. Did you mean: model.d_model"),
    (dict(grid={("data.seq_len", "model.max_seqlen"): [(32, 32)]}), r"Did you mean: model.max_seq_len"),
    (dict(grid={"model.d_model": []}), r"SWEEP\['grid'\]\['model.d_model'\] is empty"),
    (dict(grid={ZIPPED: [(32, 32, 1)]}), r"a tuple of 2 values \(one per field\), got \(32, 32, 1\)"),
    (dict(grid={"model.d_model": [32, 32]}), r"lists a value twice"),
    (dict(grid={"model.d_model": [32], ("model.d_model", "data.seq_len"): [(32, 32)]}), r"swept by two grid keys"),
    (dict(grid={"train.learning_rate": [1e-3]}), r"SWEEP\['learning_rates'\]"),
    (dict(grid={"model": [1]}), r"'model' is not a config field"),
    (dict(seeds=[]), r"SWEEP\['seeds'\] is empty"),
    (dict(learning_rates=[]), r"SWEEP\['learning_rates'\] is empty"),
    (dict(learning_rates=[0.0]), r"not a valid learning rate"),
    (dict(seeds=[-1]), r"not a valid seed"),
    (dict(grd={}), r"Unknown SWEEP keys 'grd' \(did you mean 'grid'\?\)"),
    (dict(variants={}), r"non-empty dict"),
    (dict(select_mode="maximum"), r"select_mode.*one of \('max', 'min'\)"),
    (dict(compare_at="time"), r"compare_at.*one of \('steps', 'tokens', 'flops'\)"),
    ([1, 2], r"SWEEP must be a dict"),
])
def test_every_bad_sweep_is_a_value_error_naming_it(sweep, message):
  with pytest.raises(ValueError, match=message):
    _expand(sweep)


def test_every_runs_config_is_built_at_plan_time():
  # d_model=30 over 2 heads is an odd head size: the third run is rejected before anything runs
  with pytest.raises(ValueError, match=r"Run base__d_model=30__lr=3e-3__seed=5 of experiment 'study' is invalid: "
                     r"RoPE needs an even head size"):
    _expand(dict(grid={"model.d_model": [32, 64, 30]}))
  with pytest.raises(ValueError, match=r"data.seq_len \(128\) exceeds model.max_seq_len \(64\)"):
    _expand(dict(grid={"data.seq_len": [32, 128]}))


def test_plan_of_an_experiment_file_and_of_a_registered_experiment(tmp_path):
  path = write_study(tmp_path, corpus=str(tmp_path))
  plan = spec.plan(path)
  assert plan.experiment == path
  assert [run.name for run in plan.runs] == ["a__lr=3e-3__seed=0", "a__lr=3e-3__seed=1", "b__lr=3e-3__seed=0",
                                             "b__lr=3e-3__seed=1"]
  assert experiments.get(path).name == "tiny_study"
  # a registered experiment without SWEEP: its VARIANTS at the config's learning rate and seed
  plan = spec.plan("moe_ablation")
  assert [run.variant for run in plan.runs] == list(experiments.variants("moe_ablation"))
  with pytest.raises(ValueError, match="Experiment file nowhere.py not found"):
    spec.plan("nowhere.py")


REPORT = {"target": "eval/example_accuracy:global", "train_metrics": "train/layer*/moe/max_violation,train/loss",
          "frontier_x": "math:hypot"}


def test_the_report_dict_is_stored_in_sweep_json_and_absent_without_one():
  document = _expand(dict(SWEEP, report=REPORT)).to_json()
  assert document["report"] == {"target": "eval/example_accuracy:global", "frontier_x": "math:hypot",
                                "train_metrics": ["train/layer*/moe/max_violation", "train/loss"]}
  assert "report" not in _expand().to_json()  # as planned before `report` existed
  # sweep.json's identity (resuming a sweep) does not include it
  assert store.sweep_differences(_expand().to_json(), document) == []


@pytest.mark.parametrize("report,message", [
    (["target"], r"SWEEP\['report'\] must be a dict"),
    ({"targets": "eval/loss:global"}, r"SWEEP\['report'\]: unknown keys \['targets'\]; the keys are target, "
     r"train_metrics, frontier_x"),
    ({"target": "eval/loss"}, r"SWEEP\['report'\]\['target'\]='eval/loss': expected METRIC:REFERENCE_VARIANT"),
    ({"target": "eval/loss:globl"}, r"reference variant 'globl' is not in SWEEP\['variants'\] \(global, local\)"),
    ({"train_metrics": [1]}, r"SWEEP\['report'\]\['train_metrics'\]=\[1\]: expected metric names or glob patterns"),
    ({"train_metrics": ""}, r"SWEEP\['report'\]\['train_metrics'\] names no metric"),
    ({"frontier_x": "math.hypot"}, r"SWEEP\['report'\]\['frontier_x'\]='math.hypot': expected MODULE:FUNCTION"),
    ({"frontier_x": "math:hypt"}, r"SWEEP\['report'\]\['frontier_x'\]='math:hypt': math has no function 'hypt'"),
])
def test_a_bad_report_dict_fails_at_plan_time(report, message):
  with pytest.raises(ValueError, match=message):
    _expand(dict(SWEEP, report=report))


def test_report_flags_override_the_stored_dict_and_none_turns_one_off():
  from sparseformer.train.sweeps import report_options  # pylint: disable=import-outside-toplevel
  stored = _expand(dict(SWEEP, report=REPORT)).report
  options = report_options.resolve(stored, target="eval/loss:local", frontier_x="none")
  assert options.target == ("eval/loss", "local") and options.frontier_x is None
  assert options.train_metrics == ("train/layer*/moe/max_violation", "train/loss")
  assert options.where == {"target": "--target", "train_metrics": "SWEEP['report']['train_metrics']"}
  assert report_options.resolve(None) == report_options.ReportOptions()
  with pytest.raises(TypeError, match="unknown report options"):
    report_options.resolve(None, targets="eval/loss:local")

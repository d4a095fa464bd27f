"""The calibration pass against the model's own forward and NumPy; one-shot masks over a whole model."""

import pathlib
import sys

import numpy as np
import pytest

from sparseformer.train.compression import prune, prune_masks

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import prune_helpers  # noqa: E402  (the shared tiny model)


@pytest.fixture(scope="module")
def probe():
  params, _, _, outputs = prune_helpers.probe()
  return params, outputs


def test_block_walk_equals_the_model_and_wanda_inputs_match_numpy(probe):
  params, out = probe
  stats = out["stats"]
  assert np.isfinite(out["walked"]).all()
  error = np.abs(out["walked"] - out["logits"]).max()
  assert error < 1e-5, error
  # Known activations of block 0 (from the modules), squared and summed in NumPy.
  named = {name: np.asarray(leaf[...], np.float64) for name, leaf in prune_masks.named_params(params).items()}
  ffn_in, h = out["ffn_in0"].reshape(-1, 32), out["h0"].reshape(-1, 32)
  gate = ffn_in @ named["blocks/0/ffn/w_gate"]
  hidden = gate / (1 + np.exp(-gate)) * (ffn_in @ named["blocks/0/ffn/w_up"])
  np.testing.assert_allclose(stats["blocks/0/ffn/w_gate"][0], (ffn_in**2).sum(0), rtol=1e-4)
  np.testing.assert_allclose(stats["blocks/0/ffn/w_down"][0], (hidden**2).sum(0), rtol=1e-4)
  np.testing.assert_allclose(stats["blocks/0/attention/wq"][0], (h**2).sum(0), rtol=1e-4)
  # wo's input: the head outputs times wo give the attention output.
  via_heads = np.einsum("mnh,nhd->md", out["heads0"], named["blocks/0/attention/wo"])
  np.testing.assert_allclose(via_heads, out["attended0"].reshape(-1, 32), atol=1e-5)
  np.testing.assert_allclose(stats["blocks/0/attention/wo"][0], (out["heads0"].reshape(32, -1) ** 2).sum(0),
                             rtol=1e-4)


def test_moe_statistics_match_a_numpy_loop_over_assignments(probe):
  params, out = probe
  named = {name: np.asarray(leaf[...], np.float64) for name, leaf in prune_masks.named_params(params).items()}
  x = out["moe_in"].reshape(-1, 32)
  logits = x @ named["blocks/1/ffn/router/weight"]
  w_gate, w_up = named["blocks/1/ffn/w_gate"], named["blocks/1/ffn/w_up"]
  want_in, want_hidden, want_mass = np.zeros((4, 32)), np.zeros((4, 32)), np.zeros(4)
  for n in range(x.shape[0]):
    top = np.argsort(-(logits[n] + prune_helpers.SELECTION_BIAS), kind="stable")[:2]  # bias: selection only
    gates = np.exp(logits[n, top] - logits[n, top].max())
    gates /= gates.sum()  # topk normalisation of softmax scores = softmax over the picked logits
    for expert, gate_value in zip(top, gates):
      a = x[n] @ w_gate[expert]
      want_in[expert] += x[n] ** 2
      want_hidden[expert] += (a / (1 + np.exp(-a)) * (x[n] @ w_up[expert])) ** 2
      want_mass[expert] += gate_value
  stats = out["stats"]
  np.testing.assert_allclose(stats["blocks/1/ffn/w_up"], want_in, rtol=1e-4)
  np.testing.assert_allclose(stats["blocks/1/ffn/w_down"], want_hidden, rtol=1e-4)
  np.testing.assert_allclose(stats["blocks/1/ffn#expert_mass"], want_mass, rtol=1e-4)
  assert abs(want_mass.sum() - x.shape[0]) < 1e-6 and np.all(want_mass[list(prune_helpers.DEAD_EXPERTS)] == 0)


def test_one_shot_masks_have_the_exact_pattern_on_every_prunable_weight(probe):
  params, out = probe
  stats = out["stats"]
  layouts = prune.prunable_names(params)
  assert "blocks/1/ffn/w_gate" in layouts and "embedding/table" not in layouts and len(layouts) == 4 + 3 + 4 + 3
  wanda = prune.one_shot_masks(params, "wanda", sparsity=0.5, stats=stats)
  magnitude = prune.one_shot_masks(params, "magnitude", sparsity=0.25)
  nm = prune.one_shot_masks(params, "nm", nm=(2, 4), stats=stats)
  assert set(wanda) == set(magnitude) == set(nm) == set(layouts)
  shapes = {name: leaf.shape for name, leaf in prune_masks.named_params(params).items()}
  for name, (group_axes, in_axes) in layouts.items():
    groups = int(np.prod(shapes[name][:group_axes]))
    outputs = int(np.prod(shapes[name][group_axes + in_axes:]))
    per_output = wanda[name].reshape(groups, -1, outputs)
    np.testing.assert_array_equal(per_output.sum(axis=1), per_output.shape[1] // 2)
    matrix = magnitude[name].reshape(groups, -1)
    np.testing.assert_array_equal((~matrix).sum(axis=1), matrix.shape[1] // 4)  # per matrix / per expert
    np.testing.assert_array_equal(nm[name].reshape(groups, -1, 4, outputs).sum(axis=2), 2)
  # Wanda's activation norms change the choice against plain magnitude on the same pattern.
  nm_magnitude = prune.one_shot_masks(params, "nm", nm=(2, 4), score="magnitude")
  assert not np.array_equal(nm["blocks/0/ffn/w_down"], nm_magnitude["blocks/0/ffn/w_down"])


def test_group_overrides_the_comparison_group_of_magnitude_and_wanda(probe):
  params, out = probe
  stats = out["stats"]
  shapes = {name: leaf.shape for name, leaf in prune_masks.named_params(params).items()}
  named = {name: np.asarray(leaf[...], np.float64) for name, leaf in prune_masks.named_params(params).items()}
  for method in ("magnitude", "wanda"):
    by_group = {group: prune.one_shot_masks(params, method, sparsity=0.5, stats=stats, group=group)
                for group in ("per_matrix", "per_output")}
    default = prune.one_shot_masks(params, method, sparsity=0.5, stats=stats)
    own = "per_matrix" if method == "magnitude" else "per_output"
    assert all(np.array_equal(default[name], by_group[own][name]) for name in default)
    for name, (group_axes, in_axes) in prune.prunable_names(params).items():
      groups, outputs = int(np.prod(shapes[name][:group_axes])), int(np.prod(shapes[name][group_axes + in_axes:]))
      score = np.abs(named[name]).reshape(groups, -1, outputs)  # NumPy scores, [G, I, O]
      if method == "wanda":
        score = score * np.sqrt(stats[name])[..., None]
      for group, axes in (("per_matrix", (1, 2)), ("per_output", (1,))):
        keep = by_group[group][name].reshape(score.shape)
        np.testing.assert_array_equal((~keep).sum(axis=axes), np.prod([score.shape[a] for a in axes]) // 2)
        pruned_max = np.where(keep, -np.inf, score).max(axis=axes)
        kept_min = np.where(keep, score, np.inf).min(axis=axes)
        assert np.all(pruned_max <= kept_min), (method, group, name)
    assert not np.array_equal(by_group["per_matrix"]["blocks/0/ffn/w_down"],
                              by_group["per_output"]["blocks/0/ffn/w_down"])
  with pytest.raises(ValueError, match="--group"):
    prune.one_shot_masks(params, "nm", nm=(2, 4), stats=stats, group="per_output")
  with pytest.raises(ValueError, match="--group 'per_row'"):
    prune.one_shot_masks(params, "magnitude", sparsity=0.5, group="per_row")

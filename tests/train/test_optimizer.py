"""Tests of train/optimizer.py: the learning-rate schedule, which parameters the real AdamW decays, and
DSA's warm-up freeze (only the lightning indexer learns)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed.config import DSAConfig
from sparseformer.layers.moe import config as moe_config
from sparseformer.models import presets
from sparseformer.train import optimizer
from sparseformer.train import state as state_lib
from sparseformer.train.config import TrainConfig


def _reference_lr(config: TrainConfig, step: int) -> float:
  """Linear warmup 0 -> peak over warmup_steps, then cosine from peak to peak * min_lr_ratio at `steps`."""
  peak, warmup = config.learning_rate, config.warmup_steps
  end = peak * config.min_lr_ratio
  if step < warmup:
    return peak * step / warmup
  progress = min((step - warmup) / (config.steps - warmup), 1.0)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("steps, warmup, ratio", [(100, 10, 0.1), (40, 0, 0.0), (7, 3, 0.5), (1000, 100, 1.0)])
def test_schedule_is_linear_warmup_then_cosine_to_min_lr(steps, warmup, ratio):
  config = TrainConfig(steps=steps, warmup_steps=warmup, learning_rate=3e-3, min_lr_ratio=ratio)
  # The schedule over steps 0 .. steps + 50 at once (one evaluation instead of one per step).
  every = np.asarray(jax.jit(optimizer.learning_rate_schedule(config))(jnp.arange(steps + 51)), np.float64)
  lr = lambda step: float(every[step])  # noqa: E731
  peak, end = 3e-3, 3e-3 * ratio
  near = lambda want: pytest.approx(want, rel=1e-5, abs=1e-6 * peak)  # noqa: E731  (f32 cosine near its floor)
  if warmup:
    assert lr(0) == 0.0
    assert lr(warmup // 2) == near(peak * (warmup // 2) / warmup)
  assert lr(warmup) == near(peak)  # end of warmup
  if (steps - warmup) % 2 == 0:
    assert lr(warmup + (steps - warmup) // 2) == near((peak + end) / 2)  # middle of the decay
  assert lr(steps - 1) == near(_reference_lr(config, steps - 1))  # the last update
  assert lr(steps) == near(end)
  assert lr(steps + 50) == near(end)  # a run extended past `steps` stays at the floor
  want = [_reference_lr(config, step) for step in range(steps + 51)]
  np.testing.assert_allclose(every, want, rtol=1e-5, atol=1e-6 * peak)
  assert np.all(np.diff(every[warmup:]) <= 1e-12)  # never rises after warmup


def _model_params():
  """The parameter tree of a 2-layer model with norms, an untied head, a dense and an MoE block, filled with
  random values (built abstractly: initialising the real model eagerly costs seconds)."""
  moe = moe_config.deepseek_v3(num_experts=4, top_k=2, expert_hidden=32, n_groups=2, topk_groups=1,
                               num_shared_experts=1, block_size=16)
  config = dataclasses.replace(presets.tiny(), d_model=32, num_heads=2, num_kv_heads=2, tie_embeddings=False,
                               ffn_pattern=("dense", "moe"), moe=moe)
  _, abstract_params, _ = state_lib.abstract_model(config)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), abstract_params)


def _by_name(tree) -> dict[str, np.ndarray]:
  """{"['blocks'][0]['attention']['wq']": leaf}, for trees of Variables and trees of plain leaves alike."""
  return {jax.tree_util.keystr(path).removesuffix(".value"): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _should_decay(name: str, decay_embeddings: bool) -> bool:
  """The stated rule, by name: norm scales never; the input embedding only when asked; every weight matrix."""
  if name.endswith("['scale']"):
    return False
  if name.startswith("['embedding']"):
    return decay_embeddings
  return True


def test_weight_decay_mask_follows_the_stated_rule():
  params = _model_params()
  for decay_embeddings in (False, True):
    mask = _by_name(optimizer.weight_decay_mask(params, TrainConfig(decay_embeddings=decay_embeddings)))
    expected = {name: _should_decay(name, decay_embeddings) for name in _by_name(params)}
    assert sum(expected.values()) >= 15 and sum(not d for d in expected.values()) >= 5  # both kinds are present
    assert {name: bool(value) for name, value in mask.items()} == expected


def test_real_adamw_decays_exactly_the_masked_parameters_at_the_scheduled_rate():
  config = TrainConfig(steps=6, warmup_steps=2, learning_rate=0.1, min_lr_ratio=0.2, weight_decay=0.5)
  params = _model_params()
  names = _by_name(params)
  expected = {name: _should_decay(name, config.decay_embeddings) for name in names}

  # Zero gradients: Adam's own update is 0, so each step is exactly -lr(step) * weight_decay * param on the
  # decayed leaves (matrices; not the embedding, by default) and 0 elsewhere.
  transform = optimizer.build_optimizer(config, params)

  @jax.jit
  def zero_gradient_step(params, opt_state):
    updates, opt_state = transform.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
    return updates, opt_state, optax.apply_updates(params, updates)

  opt_state = transform.init(params)
  for step in range(config.steps):
    updates, opt_state, params = zero_gradient_step(params, opt_state)
    lr = _reference_lr(config, step)
    for name, got in _by_name(updates).items():
      assert np.isfinite(got).all(), name
      if expected[name]:
        np.testing.assert_allclose(got, -lr * config.weight_decay * names[name], rtol=1e-5, atol=1e-9,
                                   err_msg=f"{name} at step {step}")
      else:
        assert not got.any(), f"{name} decayed at step {step}"
    names = _by_name(params)


def _dsa_model_config(stage: str):
  """A 2-layer model whose second layer is DSA (indexer parameters under ['blocks'][1]['attention']['routed'])."""
  dsa = DSAConfig(index_heads=2, index_head_dim=8, rope_dim=4, topk=8, block_size=4, key_chunk=8, stage=stage)
  return dataclasses.replace(presets.tiny(), d_model=32, num_heads=2, num_kv_heads=2, attention_pattern=("global", "dsa"),
                             attention=SparseAttentionConfig(dsa=dsa))


def _random_params(config, seed=0):
  _, abstract_params, _ = state_lib.abstract_model(config)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), abstract_params)


def test_dsa_warmup_steps_only_the_indexer_and_keeps_the_optimizer_state_layout():
  """DeepSeek-V3.2-Exp §2.1 warm-up: with random gradients and weight decay, one AdamW step moves every
  indexer parameter and leaves every other parameter exactly unchanged (no Adam step, no decay, moments at
  rest); the sparse stage moves everything; both stages (and a model-less build) have the same state layout,
  so a run can switch stage on resume."""
  config = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5, grad_clip=1.0)
  params = _random_params(_dsa_model_config("warmup"))
  grads = jax.tree.map(lambda leaf: jnp.asarray(np.random.default_rng(1).normal(size=leaf.shape), leaf.dtype), params)
  names = _by_name(params)
  indexer = {name for name in names if "['indexer']" in name}
  assert len(indexer) == 5 and len(names) - len(indexer) >= 10
  layouts = []
  for stage in ("warmup", "sparse"):
    transform = optimizer.build_optimizer(config, params, _dsa_model_config(stage))
    opt_state = transform.init(params)
    layouts.append(jax.tree_util.tree_structure(opt_state))
    updates, opt_state = jax.jit(transform.update)(grads, opt_state, params)
    new = _by_name(optax.apply_updates(params, updates))
    for name, value in new.items():
      assert np.isfinite(value).all(), name
      moved = not np.array_equal(value, names[name])
      assert moved == (stage == "sparse" or name in indexer), f"{stage}: {name} moved={moved}"
    moments = _by_name(opt_state[1][0].mu)  # chain(clip, adamw) -> adamw -> scale_by_adam
    if stage == "warmup":
      assert all(not moments[name].any() for name in moments if name not in indexer)
  layouts.append(jax.tree_util.tree_structure(optimizer.build_optimizer(config, params).init(params)))
  assert layouts[0] == layouts[1] == layouts[2]


def test_trainable_mask_is_the_indexer_only_in_dsa_warmup():
  params = _random_params(_dsa_model_config("warmup"))
  mask = _by_name(optimizer.trainable_mask(params, _dsa_model_config("warmup")))
  assert {name for name, keep in mask.items() if keep} == {name for name in mask if "['indexer']" in name}
  assert optimizer.trainable_mask(params, _dsa_model_config("sparse")) is None
  assert optimizer.trainable_mask(params, None) is None
  no_dsa = dataclasses.replace(_dsa_model_config("warmup"), attention_pattern=("global",))
  assert optimizer.trainable_mask(params, no_dsa) is None  # stage only matters where a DSA layer exists


def test_dsa_warmup_without_indexer_parameters_is_an_error():
  params = _model_params()  # no indexer anywhere
  with pytest.raises(ValueError, match=r"model\.attention\.dsa\.stage='warmup'.*indexer"):
    optimizer.build_optimizer(TrainConfig(), params, _dsa_model_config("warmup"))

"""Scores and masks of one weight: exact sparsity / N:M pattern by NumPy counts, Wanda against NumPy."""

import numpy as np
import pytest

from sparseformer.train.compression import prune_scores


def _random(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_per_matrix_mask_prunes_the_smallest_share_of_each_matrix():
  scores = np.abs(_random((3, 12, 10)))
  keep = np.asarray(prune_scores.per_matrix_mask(scores, 0.3))
  for g in range(3):
    assert (~keep[g]).sum() == 36  # floor(0.3 * 120)
    assert scores[g][~keep[g]].max() <= scores[g][keep[g]].min()


def test_per_output_mask_prunes_the_same_count_in_every_output():
  scores = np.abs(_random((2, 16, 5), seed=1))
  keep = np.asarray(prune_scores.per_output_mask(scores, 0.5))
  np.testing.assert_array_equal((~keep).sum(axis=1), np.full((2, 5), 8))
  for g in range(2):
    for o in range(5):
      column = scores[g, :, o]
      assert column[~keep[g, :, o]].max() <= column[keep[g, :, o]].min()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4)])
def test_nm_mask_keeps_n_of_every_m_consecutive_inputs(n, m):
  scores = np.abs(_random((2, 16, 3), seed=2))
  keep = np.asarray(prune_scores.nm_mask(scores, n, m))
  groups = keep.reshape(2, 16 // m, m, 3)
  np.testing.assert_array_equal(groups.sum(axis=2), np.full((2, 16 // m, 3), n))
  blocks = scores.reshape(2, 16 // m, m, 3)
  kept_min = np.where(groups, blocks, np.inf).min(axis=2)
  pruned_max = np.where(groups, -np.inf, blocks).max(axis=2)
  assert np.all(pruned_max <= kept_min)


def test_ties_prune_the_lower_index_first():
  keep = np.asarray(prune_scores.per_output_mask(np.zeros((1, 4, 1)), 0.5))
  np.testing.assert_array_equal(keep[0, :, 0], [False, False, True, True])


def test_wanda_scores_match_numpy_on_known_activations():
  weight = _random((1, 6, 4), seed=3)
  activations = _random((50, 6), seed=4) * np.arange(1, 7)  # [tokens, inputs]
  sumsq = (activations.astype(np.float64) ** 2).sum(axis=0)[None]
  got = np.asarray(prune_scores.wanda_scores(weight, sumsq.astype(np.float32)), np.float64)
  want = np.abs(weight[0]) * np.linalg.norm(activations.astype(np.float64), axis=0)[:, None]
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[0], want, rtol=1e-5)


def test_layouts_and_canonical_views():
  assert prune_scores.prunable_layout("blocks/0/attention/wq", 3) == (0, 1)
  assert prune_scores.prunable_layout("blocks/0/attention/wo", 3) == (0, 2)
  assert prune_scores.prunable_layout("blocks/1/ffn/w_down", 3) == (1, 1)  # experts [E, F, D]
  assert prune_scores.prunable_layout("blocks/1/ffn/w_down", 2) == (0, 1)
  for name in ("embedding/table", "blocks/0/attention_norm/scale", "blocks/1/ffn/router/weight", "lm_head"):
    assert prune_scores.prunable_layout(name, 2) is None
  assert prune_scores.canonical(np.zeros((4, 8, 32)), (0, 2)).shape == (1, 32, 32)


def test_bad_nm_is_rejected():
  with pytest.raises(ValueError, match="multiple of M=4"):
    prune_scores.nm_mask(np.ones((1, 6, 2)), 2, 4)
  for text in ("2-4", "4:2", "0:4", "x"):
    with pytest.raises(ValueError, match="--nm"):
      prune_scores.parse_nm(text)


def test_wanda_with_equal_input_norms_is_magnitude_per_output():
  weight = _random((2, 8, 6), seed=5)
  uniform = prune_scores.wanda_scores(weight, np.full((2, 8), 3.0, np.float32))
  np.testing.assert_array_equal(prune_scores.per_output_mask(uniform, 0.5),
                                prune_scores.per_output_mask(np.abs(weight), 0.5))

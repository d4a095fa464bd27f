"""Pallas grouped matmuls (interpret mode) against the per-group loop reference.

Both kernel families run here in interpret mode: GPU (Triton-style static grid with early exits,
`platform="gpu"`) and TPU (Mosaic-style scalar-prefetched visits, `platform="tpu"`). Interpret
mode starts outputs as NaN (tests/kernels/test_block_sparse_attention.py checks that), so the
NaN checks catch any output tile a kernel forgets to write, e.g. rows past sum(group_sizes).

Each platform compiles one value-and-gradient program and runs it on several group-size draws
(group sizes are traced, so no recompilation): uneven sizes, empty groups at the start, middle
and end, a group spanning several row tiles, all rows in one group, no rows at all, and
sum(group_sizes) < M; M, K and N are not tile multiples. Inputs come from the `seed` fixture.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.kernels.grouped_matmul import Tiling, gmm, gmm_reference, tgmm, tgmm_reference
from sparseformer.kernels.grouped_matmul import metadata

M, K, N, G = 100, 48, 40, 5
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max error / max |reference|


def _size_draws(rng: np.random.Generator) -> list[np.ndarray]:
  """Group-size vectors [G] covering the edge cases, plus two random partitions."""
  draws = [[30, 0, 17, 40, 3], [0, 0, M, 0, 0], [0] * G, [0, 50, 50, 0, 0]]
  for _ in range(2):
    total = int(rng.integers(1, M + 1))
    sizes = rng.multinomial(total, rng.dirichlet(np.ones(G)))
    sizes[rng.integers(G)] = 0
    draws.append(sizes)
  return [np.asarray(d, np.int32) for d in draws]


def _check_close(got, want, tol: float, what: str) -> None:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert not np.isnan(got).any(), f"{what}: NaN (an output tile left unwritten?)"
  assert not np.isnan(want).any(), f"{what}: reference NaN"
  scale = max(1.0, float(np.abs(want).max()))
  error = float(np.abs(got - want).max())
  assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x {scale:.3g}"


def _values_and_grads(matmul, lhs, rhs, sizes, d_out):
  out, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), lhs, rhs)
  return (out, *vjp(d_out.astype(out.dtype)))


CASES = {  # platform, dtype, tiling
    "gpu_f32": ("gpu", jnp.float32, Tiling(tile_m=32, tile_k=16, tile_n=16)),
    "tpu_bf16": ("tpu", jnp.bfloat16, Tiling(tile_m=16)),
    "gpu_bf16": ("gpu", jnp.bfloat16, None),
    "tpu_f32": ("tpu", jnp.float32, Tiling(tile_m=8, tile_k=128, tile_n=128)),
}


@pytest.mark.parametrize("case", [
    "gpu_f32", "tpu_bf16",
    pytest.param("gpu_bf16", marks=pytest.mark.slow),
    pytest.param("tpu_f32", marks=pytest.mark.slow),
])
def test_gmm_values_and_grads_match_reference(case, seed):
  platform, dtype, tiling = CASES[case]
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
  rhs = jnp.asarray(rng.normal(size=(G, K, N)) / np.sqrt(K), dtype)
  d_out = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
  kernel = functools.partial(gmm, platform=platform, interpret=True, tiling=tiling)
  run = jax.jit(functools.partial(_values_and_grads, kernel))
  run_ref = jax.jit(functools.partial(_values_and_grads, gmm_reference))
  for sizes in _size_draws(rng):
    got, want = run(lhs, rhs, sizes, d_out), run_ref(lhs, rhs, sizes, d_out)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
      assert g.dtype == dtype, (name, g.dtype)
      _check_close(g, w, TOL[dtype], f"{case} {name} sizes={sizes.tolist()}")
    past = np.asarray(got[0], np.float32)[int(sizes.sum()):]
    assert (past == 0).all(), f"{case}: rows past sum(group_sizes)={sizes.sum()} not zero"


@pytest.mark.slow  # tgmm is gmm's d_rhs, checked above on both platforms; suite budget
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_tgmm_matches_reference(platform, seed):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)
  sizes = np.asarray([0, 21, 0, 9], np.int32)  # empty first / middle group, 10 rows of none
  got = tgmm(lhs, grad, sizes, platform=platform, interpret=True, tiling=Tiling(tile_m=8))
  _check_close(got, tgmm_reference(lhs, grad, sizes), TOL[jnp.float32], f"tgmm {platform}")
  assert (np.asarray(got)[[0, 2]] == 0).all(), "empty groups must get zero gradients"


def _visit_pairs_numpy(sizes: np.ndarray, num_tiles: int, tile_m: int, by: str):
  """The (group, tile) pairs with work, in kernel order; zero visits as in metadata's docstring."""
  ends = np.cumsum(sizes)
  starts = ends - sizes
  pairs = []
  if by == "tile":
    for t in range(num_tiles):
      mine = [g for g in range(len(sizes)) if sizes[g] and starts[g] < (t + 1) * tile_m
              and ends[g] > t * tile_m]
      pairs += [(g, t) for g in mine] or [(len(sizes), t)]
  else:
    for g in range(len(sizes)):
      if sizes[g]:
        pairs += [(g, t) for t in range(starts[g] // tile_m, (ends[g] - 1) // tile_m + 1)]
      else:
        pairs.append((g, min(starts[g] // tile_m, num_tiles - 1)))
  return pairs


def test_visit_metadata_lists_exactly_the_work(seed):
  """TPU visit lists against a NumPy loop, within the static tiles_m + G - 1 bound; the GPU
  per-tile group ranges cover exactly the groups with rows in each tile."""
  rng = np.random.default_rng(seed)
  num_tiles, tile_m, groups = 6, 8, 7
  fns = {by: functools.partial(fn, num_tiles=num_tiles, tile_m=tile_m)
         for by, fn in (("tile", metadata.gmm_visits), ("group", metadata.tgmm_visits))}
  ranges = functools.partial(metadata.tile_group_ranges, num_tiles=num_tiles, tile_m=tile_m)
  for trial in range(8):
    total = int(rng.integers(0, num_tiles * tile_m + 1)) if trial else num_tiles * tile_m
    sizes = rng.multinomial(total, rng.dirichlet(np.full(groups, 0.5))).astype(np.int32)
    offsets = metadata.group_offsets(jnp.asarray(sizes))
    for by, fn in fns.items():
      group, tile, count = (np.asarray(a) for a in fn(offsets))
      want = _visit_pairs_numpy(sizes, num_tiles, tile_m, by)
      assert len(group) == metadata.max_visits(num_tiles, groups) >= len(want)
      assert int(count[0]) == len(want), (by, sizes)
      assert list(zip(group[:len(want)].tolist(), tile[:len(want)].tolist())) == want, (by, sizes)
      assert (group[len(want):] == group[len(want) - 1]).all(), "padding repeats the last visit"
      assert (tile[len(want):] == tile[len(want) - 1]).all()
    first, stop = (np.asarray(a) for a in ranges(offsets))
    for t in range(num_tiles):
      with_rows = {g for g, tt in _visit_pairs_numpy(sizes, num_tiles, tile_m, "tile")
                   if tt == t and g < groups}
      assert with_rows <= set(range(first[t], stop[t])), (t, sizes)
      assert all(sizes[g] == 0 for g in set(range(first[t], stop[t])) - with_rows), (t, sizes)


@pytest.mark.parametrize("call, match", [
    (lambda: gmm(np.ones((4, 3)), np.ones((2, 4, 5)), np.ones(2, np.int32)), "rhs"),
    (lambda: gmm(np.ones((4, 3)), np.ones((2, 3, 5)), np.ones(3, np.int32)), "group_sizes"),
    (lambda: gmm(np.ones((4, 3)), np.ones((2, 3, 5)), np.ones(2)), "integer"),
    (lambda: gmm(np.ones((4, 3), np.float32), np.ones((2, 3, 5), np.float16),
                 np.ones(2, np.int32)), "dtype"),
    (lambda: gmm(np.ones((4, 3), np.float32), np.ones((2, 3, 5), np.float32),
                 np.ones(2, np.int32), platform="cuda"), "platform"),
    (lambda: gmm(np.ones((64, 64), np.float32), np.ones((2, 64, 64), np.float32),
                 np.ones(2, np.int32), platform="gpu", interpret=False,
                 tiling=Tiling(tile_m=24)), "Tiling.tile_m"),
    (lambda: tgmm(np.ones((4, 3), np.float32), np.ones((5, 2), np.float32),
                  np.ones(2, np.int32)), "grad"),
])
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()

"""Independent NumPy check of Wanda's calibration statistics and masks on a trained dense workdir.

    python -m sparseformer.benchmarks.prune_wanda_check --workdir /work/runs/base_dense [--batches 2]

Re-implements the dense decoder's forward pass in float64 NumPy from the checkpoint's raw parameters (RMSNorm
with its scale, RoPE rotate-half, causal softmax attention with 1/sqrt(H), SwiGLU), collects each projection's
input X (wq/wk/wv: the normed attention input; wo: the attention output [M, N*H] in wo's (N, H) order;
w_gate/w_up: the normed FFN input; w_down: silu(x W_gate) * (x W_up)) and checks, against prune.py:
- the per-input-feature sums of squares sum_t X_tj^2 (Sun et al. 2023, eq. 1's ||X_j||_2^2);
- the Wanda 50 % keep-masks, ranked per output over its inputs (argsort here, not prune_scores);
- the model's own logits against the NumPy forward (so the NumPy walk is the model).
Then prints, per projection, how unequal the input norms are (max / median ||X_j||) and how much the Wanda and
magnitude-per-output masks differ: where the norms are near-equal, Wanda is magnitude ranked per output.
Dense attention / dense FFN models only (global attention, no MoE).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.train import data as data_lib
from sparseformer.train import trainer
from sparseformer.train.compression import prune, prune_masks


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, theta):
  """x [B, T, N, H], rotate-half (layers/rope.py's convention, re-derived)."""
  head_dim, seq = x.shape[-1], x.shape[1]
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  angles = np.arange(seq)[:, None] * freqs  # [T, H/2]
  sin, cos = np.sin(angles)[None, :, None], np.cos(angles)[None, :, None]
  a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def numpy_forward(p: dict, tokens: np.ndarray, config) -> tuple[np.ndarray, dict]:
  """(logits [B, T, V], {param name: its input X [M, I]}) of the dense decoder, float64."""
  eps, theta = config.model.norm_eps, config.model.rope_theta
  table = p["embedding/table"]
  x = table[tokens]
  batch, seq, _ = x.shape
  inputs = {}
  causal = np.tril(np.ones((seq, seq), bool))
  for layer in range(config.model.num_layers):
    pre = f"blocks/{layer}"
    h = _rms(x, p[f"{pre}/attention_norm/scale"], eps)
    tok = h.reshape(batch * seq, -1)
    for w in ("wq", "wk", "wv"):
      inputs[f"{pre}/attention/{w}"] = tok
    q, k, v = (np.einsum("md,dnh->mnh", tok, p[f"{pre}/attention/{w}"]).reshape(batch, seq, *p[
        f"{pre}/attention/{w}"].shape[1:]) for w in ("wq", "wk", "wv"))
    q, k = _rope(q, theta), _rope(k, theta)
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(causal, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(batch * seq, -1)  # (N, H) flattened, N major
    inputs[f"{pre}/attention/wo"] = heads
    wo = p[f"{pre}/attention/wo"]
    x = x + (heads @ wo.reshape(-1, wo.shape[-1])).reshape(batch, seq, -1)
    tok = _rms(x, p[f"{pre}/ffn_norm/scale"], eps).reshape(batch * seq, -1)
    gate, up = tok @ p[f"{pre}/ffn/w_gate"], tok @ p[f"{pre}/ffn/w_up"]
    hidden = gate / (1 + np.exp(-gate)) * up
    inputs[f"{pre}/ffn/w_gate"] = inputs[f"{pre}/ffn/w_up"] = tok
    inputs[f"{pre}/ffn/w_down"] = hidden
    x = x + (hidden @ p[f"{pre}/ffn/w_down"]).reshape(batch, seq, -1)
  x = _rms(x, p["final_norm/scale"], eps) if "final_norm/scale" in p else x
  return x @ table.T, inputs


def wanda_mask_numpy(weight: np.ndarray, x: np.ndarray, sparsity: float) -> np.ndarray:
  """Keep-mask of W [I, O] (already flattened input-first) by |W_ij| ||X_j||, the lowest pruned per output j."""
  score = np.abs(weight) * np.linalg.norm(x, axis=0)[:, None]
  pruned = int(np.floor(sparsity * weight.shape[0] + 1e-6))
  order = np.argsort(score, axis=0, kind="stable")
  keep = np.ones_like(weight, bool)
  np.put_along_axis(keep, order[:pruned], False, axis=0)
  return keep


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=2, help="calibration batches (the first training batches)")
  args = parser.parse_args()
  config = trainer.load_run_config(args.workdir)
  if "moe" in config.model.ffn_pattern or set(config.model.attention_pattern) != {"global"}:
    raise ValueError("--workdir: this check covers dense models (global attention, dense FFN) only.")
  corpus = data_lib.load_source(config.data)
  run = trainer.open_run(config, args.workdir, require_checkpoint=True)
  try:
    index, count = data_lib.local_batch_shard(run.batch_sharding, config.data)
    batches = data_lib.make_train_batches(config.data, corpus, index, count)
    calibration = [data_lib.to_global_batch(next(batches), run.batch_sharding, config.data.batch_size)
                   for _ in range(args.batches)]
    stats = prune.calibration_stats(run, calibration)
    masks = prune.one_shot_masks(run.state.params, "wanda", sparsity=0.5, stats=stats)
    magnitude_rows = prune.one_shot_masks(run.state.params, "magnitude", sparsity=0.5, group="per_output")
    params = {name: np.asarray(leaf[...], np.float64) for name, leaf in prune_masks.named_params(
        run.state.params).items()}
    graphdef = run.setup.graphdef
    model_logits = jax.jit(lambda pa, ex, t: nnx.merge(graphdef, pa, ex, copy=True)(t)[0])
    with jax.set_mesh(run.mesh):
      first = np.asarray(calibration[0]["inputs"])
      want_logits = np.asarray(model_logits(run.state.params, run.state.extra, jnp.asarray(first)), np.float64)
    step = int(run.state.step)
  finally:
    run.checkpointer.close()

  collected = {}
  for i, batch in enumerate(calibration):
    logits, inputs = numpy_forward(params, np.asarray(batch["inputs"]), config)
    if i == 0:
      err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
      assert np.isfinite(logits).all(), "NaN/inf in the NumPy forward"
      print(f"step {step}: NumPy forward vs model logits, max |diff| / max |logit| = {err:.2e}")
    for name, x in inputs.items():
      collected.setdefault(name, []).append(x)
  print(f"{'param':<28} {'sumsq rel err':>13} {'mask diff':>9} {'max/med |X_j|':>13} {'wanda vs mag/out':>16}")
  worst = 0.0
  for name in sorted(collected):
    x = np.concatenate(collected[name])
    sumsq = (x * x).sum(0)
    rel = np.abs(stats[name][0] - sumsq).max() / sumsq.max()
    weight = params[name].reshape(x.shape[1], -1)
    keep = wanda_mask_numpy(weight, x, 0.5)
    diff = np.mean(keep != masks[name].reshape(keep.shape))
    norms = np.sqrt(sumsq)
    differs = np.mean(masks[name] != magnitude_rows[name])
    worst = max(worst, rel)
    print(f"{name:<28} {rel:>13.2e} {diff:>9.2e} {norms.max() / np.median(norms):>13.2f} {differs:>16.1%}")
  print(f"worst sumsq relative error {worst:.2e}; tokens {int(stats['#tokens'])}")


if __name__ == "__main__":
  main()

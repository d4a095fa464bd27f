"""MoBA top-6 (blocks of 8) equals dense causal attention below position 48 at T = 64: same init, same tokens."""
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from sparseformer import experiments
from sparseformer.train import overrides
from sparseformer.models.decoder import DecoderLM
def model(v, backend):
  run = overrides.apply_overrides(experiments.get("mqar", v), [f"model.attention.backend={backend}"])
  return DecoderLM(run.model, rngs=nnx.Rngs(0))
tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 1024)
g, _ = model("global", "reference")(tokens)
for backend in ("reference", "xla"):
  m, _ = model("moba", backend)(tokens)
  d = np.abs(np.asarray(m) - np.asarray(g)).max(axis=(0, 2))
  print(backend, "max |moba - global| per position block of 8:", [float(f"{x:.2e}") for x in d.reshape(8, 8).max(1)])

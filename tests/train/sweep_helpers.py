"""A tiny sweep study written to a temporary .py file (`--experiment path.py`), shared by the sweep tests."""

import os

STUDY = '''"""Tiny sweep study of the sweep tests: 2 variants x 2 seeds, 3 steps of a 1-layer d_model=32 model."""

from sparseformer.models.config import ModelConfig
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig

VARIANTS = {{"a": [], "b": ["data.val_fraction=0.2"]}}  # b compiles to the same steps as a
SWEEP = dict(variants=VARIANTS, learning_rates=[3e-3], seeds=[0, 1], select="eval/loss")


def config() -> RunConfig:
  model = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=32)
  data = DataConfig(path={corpus!r}, seq_len=32, batch_size=4, num_val_batches=1, val_fraction=0.1,
                    cache_dir={cache!r})
  train = TrainConfig(steps={steps}, learning_rate=3e-3, warmup_steps=1, log_every=1, eval_every=0,
                      checkpoint_every={steps}, sample_tokens=0, progress_bar=False, peak_flops=1e11)
  return RunConfig(name="tiny_study", model=model, data=data, train=train)
'''


def write_study(directory, corpus: str, steps: int = 3) -> str:
  """Writes the tiny study into `directory`; returns its path."""
  path = os.path.join(str(directory), "tiny_study.py")
  with open(path, "w", encoding="utf-8") as file:
    file.write(STUDY.format(corpus=corpus, cache=os.path.join(str(directory), "cache"), steps=steps))
  return path


def compile_cache_env(directory) -> dict[str, str]:
  """Environment for sweep children that shares compiled steps between runs of equal shapes (saves CPU);
  pass tmp_path_factory.getbasetemp() to share them across the session's tests."""
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(str(directory), "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

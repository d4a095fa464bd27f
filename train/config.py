"""Run configuration: model + data + optimisation + mesh, as frozen typed dataclasses."""

import dataclasses

from sparseformer.models.config import ModelConfig
from sparseformer.train.compression.prune_masks import PruningConfig
from sparseformer.train.compression.quantize_config import QuantizationConfig
from sparseformer.train.compression.distill_config import DistillConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.energy import EnergyConfig
from sparseformer.train.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging, evaluation and checkpointing of a run."""

  steps: int = 1000  # optimizer steps in the whole run (a resumed run continues up to this)
  stop_at_step: int = 0  # stop early with a checkpoint, as if interrupted (time-sliced jobs); 0 = never
  learning_rate: float = 3e-3  # peak learning rate after warmup
  warmup_steps: int = 100  # linear warmup from 0
  min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
  beta1: float = 0.9  # AdamW first-moment decay
  beta2: float = 0.95  # AdamW second-moment decay
  adam_eps: float = 1e-8  # AdamW epsilon
  weight_decay: float = 0.1  # decoupled weight decay on matrices
  decay_embeddings: bool = False  # also decay embeddings (norm scales are never decayed)
  grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables
  grad_accum_steps: int = 1  # micro-batches per optimizer step (data.batch_size is split across them)
  log_every: int = 10  # steps between metrics.jsonl / TensorBoard lines
  eval_every: int = 200  # steps between validation passes; 0 = only at the end
  checkpoint_every: int = 500  # steps between (async) checkpoints; a final one is always written
  keep_checkpoints: int = 3  # newest checkpoints kept on disk
  peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = measure a matmul at start-up
  seed: int = 0  # parameter init seed
  sample_prompt: str = "def "  # prompt of the sample printed at the end of training
  sample_tokens: int = 200  # tokens generated for that sample
  progress_bar: bool = True  # tqdm progress bar on process 0
  quantization: QuantizationConfig = QuantizationConfig()  # quantization-aware training (off by default)
  distill: DistillConfig = DistillConfig()  # knowledge distillation from a frozen teacher run (off by default)
  energy: EnergyConfig = EnergyConfig()  # energy and CO2e accounting of the run
  prune_masks: str = ""  # workdir (or .npz) of `sparseformer prune`: its masks re-applied after every step
  pruning: PruningConfig = PruningConfig()  # gradual magnitude pruning during training (off by default)

  def __post_init__(self):
    for name in ("steps", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}.")
    if self.stop_at_step < 0:
      raise ValueError(f"train.stop_at_step must be >= 0 (0 = never), got {self.stop_at_step}.")
    if self.learning_rate <= 0:
      raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}.")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}.")
    for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a training run needs; `sparseformer train --set a.b=v` overrides any field."""

  name: str = "run"  # experiment name (for logs)
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    if self.data.resolved_source == "task":
      self._check_task()
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                       "raise model.max_seq_len or lower data.seq_len.")
    if self.data.batch_size % self.train.grad_accum_steps:
      raise ValueError(f"data.batch_size ({self.data.batch_size}) must be a multiple of train.grad_accum_steps "
                       f"({self.train.grad_accum_steps}).")

  def _check_task(self) -> None:
    """A task fixes the vocabulary and every evaluation mix's length: the model must match (an error, never a
    silent change, so a run's config.json always says what was trained)."""
    task = self.data.task_config
    field = f"data.{self.data.task}.vocab_size" if hasattr(task, "vocab_size") else f"data.task={self.data.task!r}"
    if self.model.vocab_size != task.task_vocab_size:
      raise ValueError(f"model.vocab_size={self.model.vocab_size} does not match the vocabulary of {field} "
                       f"({task.task_vocab_size} ids); set model.vocab_size={task.task_vocab_size}.")
    for mix in task.mixes(self.data.seq_len)[1:]:
      if mix.seq_len > self.model.max_seq_len:
        raise ValueError(f"data.{self.data.task}.eval_mixes[{mix.name}] has seq_len {mix.seq_len}, above "
                         f"model.max_seq_len ({self.model.max_seq_len}); raise model.max_seq_len to "
                         f"{mix.seq_len} or shorten the mix.")

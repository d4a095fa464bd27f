"""DistillConfig: knowledge distillation from a frozen teacher run (`--set train.distill.*`)."""

import dataclasses

LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Hinton et al. (2015) soft targets, plus an optional hidden-state cosine loss; off while `teacher` is ""."""

  teacher: str = ""  # workdir of a trained run (its latest checkpoint, frozen); "" = no distillation
  alpha: float = 0.5  # weight of the soft loss; the hard LM loss gets 1 - alpha
  temperature: float = 1.0  # softmax temperature T of both models; the soft loss is scaled by T^2
  loss: str = "forward_kl"  # forward_kl = KL(teacher || student) | reverse_kl = KL(student || teacher) | jsd
  hidden_weight: float = 0.0  # weight of the mean (1 - cosine) between mapped hidden states; 0 = off
  layer_map: tuple[int, ...] = ()  # teacher layer for each student layer (-1 = none); () = evenly spaced

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"train.distill.loss={self.loss!r} is not one of {', '.join(LOSSES)}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"train.distill.alpha must lie in [0, 1], got {self.alpha}.")
    if not self.temperature > 0:
      raise ValueError(f"train.distill.temperature must be positive, got {self.temperature}.")
    if not self.hidden_weight >= 0:
      raise ValueError(f"train.distill.hidden_weight must be >= 0, got {self.hidden_weight}.")
    if any(layer < -1 for layer in self.layer_map):
      raise ValueError(f"train.distill.layer_map={self.layer_map}: entries are teacher layers (>= 0) or -1.")
    if not self.teacher and (self.alpha != DistillConfig.alpha or self.temperature != DistillConfig.temperature
                             or self.loss != DistillConfig.loss or self.hidden_weight or self.layer_map):
      raise ValueError("train.distill.* is set but train.distill.teacher is empty; set "
                       "train.distill.teacher=DIR (a trained run's workdir) or drop the other train.distill fields.")
    if self.layer_map and not self.hidden_weight:
      raise ValueError("train.distill.layer_map only matters for the hidden-state loss; set "
                       "train.distill.hidden_weight > 0 or drop layer_map.")

  @property
  def enabled(self) -> bool:
    return bool(self.teacher)

  def resolved_layer_map(self, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs: `layer_map` without its -1 entries, or by default student layer i
    -> teacher layer round((i + 1) * Lt / Ls) - 1 (the last student layer meets the last teacher layer)."""
    if not self.layer_map:
      return tuple((i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers))
    if len(self.layer_map) != student_layers:
      raise ValueError(f"train.distill.layer_map has {len(self.layer_map)} entries but the student has "
                       f"{student_layers} layers; give one teacher layer (or -1) per student layer.")
    if max(self.layer_map) >= teacher_layers:
      raise ValueError(f"train.distill.layer_map={self.layer_map} names teacher layer {max(self.layer_map)}, but "
                       f"the teacher has {teacher_layers} layers (0..{teacher_layers - 1}).")
    pairs = tuple((i, t) for i, t in enumerate(self.layer_map) if t >= 0)
    if not pairs:
      raise ValueError(f"train.distill.layer_map={self.layer_map} maps no layer; map at least one or set "
                       "train.distill.hidden_weight=0.")
    return pairs

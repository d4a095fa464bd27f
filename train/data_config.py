"""DataConfig: what the model reads and how it is batched (the run config's `data` group)."""

import dataclasses

from sparseformer.train.tasks.config import TASKS, CopyConfig, ListOpsConfig, MQARConfig, PasskeyConfig

SOURCES = ("auto", "stdlib", "text", "memmap", "task")
MEMMAP_DTYPES = ("uint8", "uint16")
MEMMAP_SUFFIXES = (".bin", ".npy")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline settings. Every invalid value is rejected here, naming the field.

  Sources:
    stdlib  the running Python's standard library (source + documentation text); no
            download. Results depend on the Python version (recorded in the metadata).
    text    a text file, or a directory of text files read recursively in sorted order.
    memmap  a pre-tokenized 1-D token file: `.npy`, or raw `.bin` of `memmap_dtype`.
    auto    `stdlib` when `path` is empty, `memmap` for `.bin`/`.npy`, otherwise `text`.
    task    a synthetic task (`task`: mqar | listops | passkey | copy, settings in data.<task>.*, see
            train/tasks/) whose batches carry their own loss_mask; its vocabulary is model.vocab_size.
  """

  source: str = "auto"  # auto | stdlib | text | memmap | task (see above)
  task: str = ""  # with source='task': mqar | listops | passkey | copy
  path: str = ""  # file or directory for text/memmap sources; empty for stdlib
  memmap_dtype: str = "uint16"  # element type of a raw `.bin` file: uint8 | uint16 (`.npy` carries its own)
  seq_len: int = 256  # tokens per training example (the model also sees one more as the last target)
  batch_size: int = 32  # global batch: examples per step summed over all processes
  seed: int = 0  # seeds the per-epoch window order and offset; the data order is a function of it alone
  val_fraction: float = 0.02  # share of documents (stdlib/text) or tail tokens (memmap) held out
  num_val_batches: int = 8  # at most this many validation batches (fewer if the split is short); 0 = none
  cache_dir: str = ""  # tokenized-corpus cache; "" = $SPARSEFORMER_CACHE or ~/.cache/sparseformer
  mqar: MQARConfig = MQARConfig()  # data.task='mqar': multi-query associative recall (Zoology)
  listops: ListOpsConfig = ListOpsConfig()  # data.task='listops': ListOps (LRA)
  passkey: PasskeyConfig = PasskeyConfig()  # data.task='passkey': passkey retrieval (Landmark Attention)
  copy: CopyConfig = CopyConfig()  # data.task='copy': selective copying (Mamba)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"data.source={self.source!r} is not one of {SOURCES}; "
                       f"set data.source to one of them (or 'auto' to pick from data.path).")
    if self.source == "task":
      if self.task not in TASKS:
        raise ValueError(f"data.task={self.task!r} is not a task; set data.task to one of {TASKS}.")
      if self.path:
        raise ValueError(f"data.source='task' generates its examples and takes no path, but data.path="
                         f"{self.path!r}; set data.path='' (or another data.source to read the file).")
    elif self.task:
      raise ValueError(f"data.task={self.task!r} is set but data.source={self.source!r}; set data.source='task' "
                       "to train on the task, or data.task='' to read text.")
    if self.source == "stdlib" and self.path:
      raise ValueError(f"data.source='stdlib' reads the Python standard library and takes no path, "
                       f"but data.path={self.path!r}; set data.source='auto' (or 'text'/'memmap') "
                       f"to read the path, or data.path='' for the standard library.")
    if self.source in ("text", "memmap") and not self.path:
      raise ValueError(f"data.source={self.source!r} needs a file: set data.path=/path/to/file.")
    if self.resolved_source == "memmap" and not self.path.endswith(MEMMAP_SUFFIXES):
      raise ValueError(f"data.path={self.path!r}: a memmap source must be a `.bin` (raw tokens of "
                       f"data.memmap_dtype) or `.npy` file; rename it or set data.source='text'.")
    if self.memmap_dtype not in MEMMAP_DTYPES:
      raise ValueError(f"data.memmap_dtype={self.memmap_dtype!r} is not supported; set it to one of "
                       f"{MEMMAP_DTYPES} (token ids must fit: the byte vocabulary needs uint16).")
    for name in ("seq_len", "batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"data.{name}={value!r} must be a positive integer.")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
      raise ValueError(f"data.seed={self.seed!r} must be a non-negative integer.")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1), e.g. 0.02.")
    if not isinstance(self.num_val_batches, int) or self.num_val_batches < 0:
      raise ValueError(f"data.num_val_batches={self.num_val_batches!r} must be an integer >= 0.")
    if self.val_fraction == 0.0 and self.num_val_batches > 0:
      raise ValueError(f"data.val_fraction=0 holds out no validation data but "
                       f"data.num_val_batches={self.num_val_batches}; raise data.val_fraction "
                       f"(e.g. 0.02) or set data.num_val_batches=0.")
    if self.source == "task":
      self.task_config.validate(self.seq_len)

  @property
  def task_config(self):
    """The selected task's settings (data.<task>); only with source='task'."""
    if self.source != "task":
      raise ValueError(f"data.source={self.source!r} is not a task; set data.source='task' and data.task.")
    return getattr(self, self.task)

  @property
  def resolved_source(self) -> str:
    """The concrete source: `auto` resolved from `path`."""
    if self.source != "auto":
      return self.source  # including "task"
    if not self.path:
      return "stdlib"
    return "memmap" if self.path.endswith(MEMMAP_SUFFIXES) else "text"

  @property
  def window_len(self) -> int:
    """Tokens per example window: seq_len inputs + the one-step-shifted last target."""
    return self.seq_len + 1

"""Per-task settings (`data.mqar.*`, `data.listops.*`, `data.passkey.*`, `data.copy.*`) and evaluation mixes.

Each task's fields live in a frozen dataclass nested in DataConfig; `validate(seq_len)` rejects settings that
cannot make an example, naming the field and the fix. This module imports nothing from train/, so
train/data_config.py can import it without cycles.
"""

import dataclasses
import re

TASKS = ("mqar", "listops", "passkey", "copy")
_MIX_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Mix:
  """One evaluation mix: `name` ("" = the validation mix, logged as eval/<metric>), its task config and length."""

  name: str
  task: object
  seq_len: int


def _check_positive(prefix: str, **values) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"data.{prefix}.{name}={value!r} must be a positive integer.")


def _parse_mixes(prefix: str, mixes: tuple[str, ...], fields: tuple[str, str], types: tuple[type, type]
                 ) -> list[tuple[str, object, int]]:
  """[(name, first, length)] from "NAME:first:length" strings, or a ValueError naming data.<prefix>.eval_mixes."""
  parsed, names = [], set()
  for text in mixes:
    parts = str(text).split(":")
    example = f"'long:{'8' if types[0] is int else '0.5'}:256'"
    if len(parts) != 3 or not _MIX_NAME.match(parts[0]):
      raise ValueError(f"data.{prefix}.eval_mixes entry {text!r} is not 'NAME:{fields[0]}:{fields[1]}' "
                       f"(NAME a letter then letters, digits or _), e.g. {example}.")
    try:
      first, length = types[0](parts[1]), types[1](parts[2])
    except ValueError:
      raise ValueError(f"data.{prefix}.eval_mixes entry {text!r}: {fields[0]} and {fields[1]} must be "
                       f"{types[0].__name__} and {types[1].__name__}, e.g. {example}.") from None
    if parts[0] in names:
      raise ValueError(f"data.{prefix}.eval_mixes names {parts[0]!r} twice; give each mix its own name.")
    names.add(parts[0])
    parsed.append((parts[0], first, length))
  return parsed


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Multi-query associative recall (Arora et al. 2023, Zoology §3); see train/tasks/mqar.py."""

  num_kv_pairs: int = 4  # key-value pairs per example; the queries ask for every key once
  vocab_size: int = 8192  # keys from [1, V/2), values from [V/2, V) (Zoology uses 8192); = model.vocab_size
  power_a: float = 0.01  # query gaps drawn with p(g) ~ g^(power_a - 1): small a = queries soon after the pairs
  random_non_queries: bool = True  # filler tokens uniform over the vocabulary (Zoology's default), else id 0
  eval_mixes: tuple[str, ...] = ()  # extra evaluation mixes "NAME:num_kv_pairs:seq_len", e.g. ("long:16:256",)

  @property
  def task_vocab_size(self) -> int:
    return self.vocab_size

  def validate(self, seq_len: int, *, field: str = "data.mqar.num_kv_pairs", length_field: str = "data.seq_len"
               ) -> None:
    _check_positive("mqar", num_kv_pairs=self.num_kv_pairs, vocab_size=self.vocab_size)
    if not 0 < self.power_a <= 1:
      raise ValueError(f"data.mqar.power_a={self.power_a!r} must lie in (0, 1] (1 = uniform gaps; Zoology: 0.01).")
    if 4 * self.num_kv_pairs > seq_len:
      raise ValueError(f"{field}={self.num_kv_pairs} needs {length_field} >= 4 x num_kv_pairs = "
                       f"{4 * self.num_kv_pairs} (2 tokens per pair, then room for a query every other slot), "
                       f"but it is {seq_len}; lower {field} or raise {length_field}.")
    if self.num_kv_pairs > self.vocab_size // 2 - 1:
      raise ValueError(f"{field}={self.num_kv_pairs} distinct keys do not fit the key half [1, "
                       f"{self.vocab_size // 2}) of data.mqar.vocab_size={self.vocab_size}; raise "
                       f"data.mqar.vocab_size to at least {2 * self.num_kv_pairs + 2} or lower {field}.")
    for name, pairs, length in _parse_mixes("mqar", self.eval_mixes, ("num_kv_pairs", "seq_len"), (int, int)):
      _check_positive("mqar", eval_mix_num_kv_pairs=pairs, eval_mix_seq_len=length)
      dataclasses.replace(self, num_kv_pairs=pairs, eval_mixes=()).validate(
          length, field=f"data.mqar.eval_mixes[{name}] num_kv_pairs", length_field=f"its seq_len")

  def mixes(self, seq_len: int) -> list[Mix]:
    extra = _parse_mixes("mqar", self.eval_mixes, ("num_kv_pairs", "seq_len"), (int, int))
    base = dataclasses.replace(self, eval_mixes=())
    return [Mix("", base, seq_len)] + [Mix(name, dataclasses.replace(base, num_kv_pairs=pairs), length)
                                       for name, pairs, length in extra]


@dataclasses.dataclass(frozen=True)
class ListOpsConfig:
  """ListOps (Nangia & Bowman 2018) as in Long Range Arena (Tay et al. 2021); see train/tasks/listops.py."""

  max_depth: int = 10  # deepest operator nesting (LRA: 10)
  max_args: int = 10  # most arguments of one operator (LRA: 10)
  min_length: int = 500  # shortest expression in tokens (LRA: 500); shorter trees are redrawn
  max_length: int = 2000  # longest expression in tokens (LRA: 2000); <= data.seq_len, padded to it

  @property
  def task_vocab_size(self) -> int:
    return 16  # 10 digits, 4 operators, "]", PAD

  def validate(self, seq_len: int) -> None:
    _check_positive("listops", max_depth=self.max_depth, max_args=self.max_args, min_length=self.min_length,
                    max_length=self.max_length)
    if self.max_args < 2:
      raise ValueError(f"data.listops.max_args={self.max_args} must be >= 2 (an operator takes 2 or more).")
    if self.max_depth < 2 or self.min_length < 4:
      raise ValueError(f"data.listops.max_depth={self.max_depth} must be >= 2 and data.listops.min_length="
                       f"{self.min_length} >= 4: the smallest expression is '[MIN a b ]' at depth 2.")
    if self.min_length > self.max_length:
      raise ValueError(f"data.listops.min_length={self.min_length} exceeds data.listops.max_length="
                       f"{self.max_length}; lower min_length or raise max_length.")
    if self.max_length > seq_len:
      raise ValueError(f"data.listops.max_length={self.max_length} exceeds data.seq_len={seq_len}; set "
                       f"data.seq_len={self.max_length} or lower data.listops.max_length.")
    # The longest tree at this depth and width: max_args children at every level below the root.
    longest, width = 0, 1
    for _ in range(self.max_depth - 1):
      longest, width = longest + 2 * width, width * self.max_args
    if longest + width < self.min_length:
      raise ValueError(f"data.listops.min_length={self.min_length}: no tree of max_depth={self.max_depth} and "
                       f"max_args={self.max_args} is that long (at most {longest + width} tokens); lower "
                       f"min_length or raise max_depth / max_args.")

  def mixes(self, seq_len: int) -> list[Mix]:
    return [Mix("", self, seq_len)]


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention §4.2); see train/tasks/passkey.py."""

  num_digits: int = 5  # digits of the passkey (a uniform number with this many digits, no leading zero)
  min_depth: float = 0.0  # where the key sentence sits, as a fraction of the filler before it: drawn
  max_depth: float = 1.0  # uniformly in [min_depth, max_depth] per example
  min_length: int = 0  # shortest example in bytes, lengths uniform in [min_length, seq_len]; 0 = always seq_len
  eval_mixes: tuple[str, ...] = ()  # extra evaluation mixes "NAME:depth:seq_len" at one depth, e.g. ("deep:0.1:512",)

  @property
  def task_vocab_size(self) -> int:
    return 259  # the byte tokenizer (train/tokenizer.py); padding is its PAD id

  def validate(self, seq_len: int, *, length_field: str = "data.seq_len") -> None:
    from sparseformer.train.tasks import passkey  # pylint: disable=import-outside-toplevel  (prompt lengths)

    _check_positive("passkey", num_digits=self.num_digits)
    if self.num_digits > 18:
      raise ValueError(f"data.passkey.num_digits={self.num_digits} must be <= 18 (a 64-bit passkey).")
    if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
      raise ValueError(f"data.passkey.min_depth={self.min_depth} and max_depth={self.max_depth} must satisfy "
                       "0 <= min_depth <= max_depth <= 1 (fractions of the filler before the key).")
    if self.min_length < 0 or self.min_length > seq_len:
      raise ValueError(f"data.passkey.min_length={self.min_length} must lie in [0, {length_field}={seq_len}] "
                       "(0 = every example is seq_len long).")
    shortest = passkey.fixed_length(self.num_digits) - 1  # inputs: every byte but the last answer digit
    if (self.min_length or seq_len) < shortest:
      raise ValueError(f"A passkey example with num_digits={self.num_digits} needs at least {shortest} input "
                       f"bytes (prompt, key sentence, question, answer), but {length_field}={seq_len} and "
                       f"data.passkey.min_length={self.min_length}; raise them to >= {shortest}.")
    for name, depth, length in _parse_mixes("passkey", self.eval_mixes, ("depth", "seq_len"), (float, int)):
      if not 0.0 <= depth <= 1.0:
        raise ValueError(f"data.passkey.eval_mixes[{name}] depth={depth} must lie in [0, 1].")
      dataclasses.replace(self, min_depth=depth, max_depth=depth, min_length=0, eval_mixes=()).validate(
          length, length_field=f"data.passkey.eval_mixes[{name}] seq_len")

  def mixes(self, seq_len: int) -> list[Mix]:
    extra = _parse_mixes("passkey", self.eval_mixes, ("depth", "seq_len"), (float, int))
    base = dataclasses.replace(self, eval_mixes=())
    return [Mix("", base, seq_len)] + [
        Mix(name, dataclasses.replace(base, min_depth=depth, max_depth=depth, min_length=0), length)
        for name, depth, length in extra]


@dataclasses.dataclass(frozen=True)
class CopyConfig:
  """Selective copying (Gu & Dao 2023, Mamba §3.1 / Fig. 2); see train/tasks/copy.py."""

  num_tokens: int = 8  # data tokens to memorise and copy out
  vocab_size: int = 16  # 0 = noise, 1..V-2 = data tokens, V-1 = the copy marker (Mamba: 16); = model.vocab_size

  @property
  def task_vocab_size(self) -> int:
    return self.vocab_size

  def validate(self, seq_len: int) -> None:
    _check_positive("copy", num_tokens=self.num_tokens, vocab_size=self.vocab_size)
    if self.vocab_size < 3:
      raise ValueError(f"data.copy.vocab_size={self.vocab_size} must be >= 3 (noise, one data token, marker).")
    if 2 * self.num_tokens > seq_len:
      raise ValueError(f"data.copy.num_tokens={self.num_tokens} needs data.seq_len >= 2 x num_tokens = "
                       f"{2 * self.num_tokens} (the tokens among the noise, then as many markers), but it is "
                       f"{seq_len}; lower data.copy.num_tokens or raise data.seq_len.")

  def mixes(self, seq_len: int) -> list[Mix]:
    return [Mix("", self, seq_len)]

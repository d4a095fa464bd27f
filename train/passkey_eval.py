"""`sparseformer eval --task passkey`: passkey retrieval accuracy by greedy generation over lengths x depths.

    sparseformer eval --workdir DIR --task passkey --lengths 256,512,1024 --depths 0,0.25,0.5,0.75,1 --samples 20

Mohtashami & Jaggi 2023 (Landmark Attention, §4.2) measure retrieval by generation: the model reads the prompt up
to "... The pass key is " and must produce the passkey's digits. Every example comes from train/tasks/passkey.py's
generator through tasks/batches.examples (the "test" split, data.seed of the run, data.passkey.num_digits of the
run or the default), each cell at one depth and one exact length: example i of every cell has the same index, so
cells are a paired comparison. The prompt is the example's inputs up to the first answer target; the answer is
its masked targets. `generate` decodes num_digits tokens greedily over the KV cache (no EOS stop).

Accuracy = examples whose digits are all right; digit accuracy = right digits / all digits. Writes passkey.csv,
passkey.json (rows + settings + checkpoint step), passkey.md (accuracy table, depth x length) and passkey.png
(heatmap) into --out DIR (a new directory) or the workdir; existing files are never overwritten.
"""

import csv
import dataclasses
import io
import json
import os

import numpy as np

from sparseformer.train import generate
from sparseformer.train.tasks import batches
from sparseformer.train.tasks.config import PasskeyConfig

FILES = ("passkey.csv", "passkey.json", "passkey.md", "passkey.png")


def parse_list(text: str, cast: type, flag: str) -> list:
  """'256,512' -> [256, 512], or a ValueError naming `flag`."""
  try:
    values = [cast(part) for part in str(text).split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"{flag}={text!r} must be a comma-separated list of {cast.__name__} values, e.g. "
                     f"{flag} {'256,512' if cast is int else '0,0.5,1'}.") from None
  if not values:
    raise ValueError(f"{flag} is empty; give at least one value.")
  return values


def check_grid(passkey_config: PasskeyConfig, lengths: list[int], depths: list[float], samples: int,
               max_seq_len: int) -> None:
  """ValueError naming --lengths / --depths / --samples before any example is built or model loaded."""
  if not isinstance(samples, int) or samples < 1:
    raise ValueError(f"--samples={samples!r} must be a positive integer (examples per cell).")
  for depth in depths:
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"--depths value {depth} must lie in [0, 1] (0 = key right after the prompt, 1 = right "
                       "before the question).")
  for length in lengths:
    if length > max_seq_len:
      raise ValueError(f"--lengths value {length} exceeds the model's max_seq_len={max_seq_len}; the cache "
                       f"holds no more positions. Use lengths <= {max_seq_len}.")
    dataclasses.replace(passkey_config, min_length=0, eval_mixes=()).validate(length, length_field="--lengths value")


def cell_examples(passkey_config: PasskeyConfig, length: int, depth: float, samples: int, seed: int
                  ) -> tuple[list[np.ndarray], np.ndarray]:
  """(prompts: int32 arrays, answers: int32 [samples, num_digits]) of one cell, from the task's generator."""
  cell = dataclasses.replace(passkey_config, min_depth=depth, max_depth=depth, min_length=0, eval_mixes=())
  batch = batches.examples("passkey", cell, length, seed, "test", np.arange(samples))
  answer_mask = batch["loss_mask"] > 0
  first = np.argmax(answer_mask, axis=1)  # the first answer digit is the target of this input position
  prompts = [batch["inputs"][row, :first[row] + 1] for row in range(samples)]
  answers = np.stack([batch["targets"][row][answer_mask[row]] for row in range(samples)])
  return prompts, answers


def evaluate(model, passkey_config: PasskeyConfig, lengths: list[int], depths: list[float], *, samples: int,
             seed: int, batch_size: int = 32, log=print) -> list[dict]:
  """One row per (length, depth): accuracy and digit accuracy of greedy generation over `samples` examples."""
  check_grid(passkey_config, lengths, depths, samples, model.config.max_seq_len)
  rows = []
  for length in lengths:
    for depth in depths:
      prompts, answers = cell_examples(passkey_config, length, depth, samples, seed)
      produced = []
      for start in range(0, samples, batch_size):
        produced += generate.generate(model, prompts[start:start + batch_size], temperature=0.0, eos_id=None,
                                      max_new_tokens=passkey_config.num_digits)
      correct = np.stack(produced) == answers
      rows.append(dict(length=length, depth=depth, samples=samples, accuracy=float(correct.all(axis=1).mean()),
                       digit_accuracy=float(correct.mean())))
      log(f"passkey length {length:6d} depth {depth:4.2f}: accuracy {rows[-1]['accuracy']:.3f} "
          f"(digits {rows[-1]['digit_accuracy']:.3f}, {samples} examples)")
  return rows


def markdown(rows: list[dict]) -> str:
  """Accuracy table: one line per depth, one column per length."""
  lengths = sorted({row["length"] for row in rows})
  depths = sorted({row["depth"] for row in rows})
  value = {(row["length"], row["depth"]): row["accuracy"] for row in rows}
  lines = ["| depth \\ length | " + " | ".join(str(length) for length in lengths) + " |",
           "|---:|" + "---:|" * len(lengths)]
  for depth in depths:
    lines.append(f"| {depth:g} | " + " | ".join(f"{value[(length, depth)]:.2f}" for length in lengths) + " |")
  return "\n".join(lines) + "\n"


def heatmap(rows: list[dict], path: str, title: str) -> None:
  """Accuracy heatmap PNG (depth down, length across), each cell labelled with its value."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  (Agg canvas, no pyplot state)

  lengths = sorted({row["length"] for row in rows})
  depths = sorted({row["depth"] for row in rows})
  grid = np.zeros((len(depths), len(lengths)))
  for row in rows:
    grid[depths.index(row["depth"]), lengths.index(row["length"])] = row["accuracy"]
  figure = Figure(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
  axes = figure.subplots()
  image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
  axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
  axes.set_xlabel("context length (bytes)")
  axes.set_ylabel("depth of the key")
  axes.set_title(title, fontsize=9)
  for (i, j), accuracy in np.ndenumerate(grid):
    axes.text(j, i, f"{accuracy:.2f}", ha="center", va="center", color="white" if accuracy < 0.5 else "black")
  figure.colorbar(image, ax=axes, label="retrieval accuracy")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def check_out(out_dir: str, *, new_dir: bool) -> None:
  """ValueError when writing would replace anything: --out must be new, the workdir must lack the files."""
  if new_dir and os.path.exists(out_dir):
    raise ValueError(f"--out {out_dir} already exists; give a new directory (nothing is overwritten).")
  existing = [name for name in FILES if os.path.exists(os.path.join(out_dir, name))]
  if existing:
    raise ValueError(f"{out_dir} already holds {', '.join(existing)}; pass --out NEW_DIR or move them away "
                     "(nothing is overwritten).")


def write_outputs(rows: list[dict], out_dir: str, meta: dict) -> list[str]:
  """The four files into `out_dir` (created if missing); each written to a temporary name, then renamed."""
  os.makedirs(out_dir, exist_ok=True)
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  title = f"passkey retrieval, step {meta.get('step')}, {meta['samples']} examples per cell"
  contents = {"passkey.csv": table.getvalue(), "passkey.json": json.dumps(dict(meta, rows=rows), indent=2) + "\n",
              "passkey.md": f"{title}\n\n" + markdown(rows)}
  paths = []
  for name in FILES:
    path = os.path.join(out_dir, name)
    if name == "passkey.png":
      heatmap(rows, path + ".tmp.png", title)
      os.replace(path + ".tmp.png", path)
    else:
      with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(contents[name])
      os.replace(path + ".tmp", path)
    paths.append(path)
  return paths


def run(args) -> int:
  """`sparseformer eval --task passkey`: checks every flag and the output place, loads the checkpoint, writes."""
  # pylint: disable=import-outside-toplevel  (JAX and the trainer load after the flags are checked)
  import jax

  from sparseformer.train import trainer

  config = trainer.load_run_config(args.workdir)
  lengths = parse_list(args.lengths, int, "--lengths")
  depths = parse_list(args.depths, float, "--depths")
  passkey_config = config.data.passkey
  check_grid(passkey_config, lengths, depths, args.samples, config.model.max_seq_len)
  if config.model.vocab_size < 259:
    raise ValueError(f"The run's model.vocab_size={config.model.vocab_size} does not cover the byte tokenizer "
                     "(259); passkey retrieval needs a byte-level model.")
  out_dir = args.out or args.workdir
  check_out(out_dir, new_dir=args.out is not None)
  run_ = trainer.open_run(config, args.workdir, require_checkpoint=True)
  try:
    with jax.set_mesh(run_.mesh):
      rows = evaluate(run_.model(), passkey_config, lengths, depths, samples=args.samples, seed=config.data.seed,
                      log=trainer.log)
    step = int(run_.state.step)
  finally:
    run_.checkpointer.close()
  meta = dict(workdir=os.path.abspath(args.workdir), step=step, samples=args.samples, seed=config.data.seed,
              split="test", num_digits=passkey_config.num_digits, lengths=lengths, depths=depths)
  paths = write_outputs(rows, out_dir, meta)
  trainer.log(markdown(rows) + "Wrote " + ", ".join(paths))
  return 0

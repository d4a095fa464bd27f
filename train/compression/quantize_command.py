"""`sparseformer quantize`: post-training quantization of a trained workdir into a new one, beside the original.

    sparseformer quantize --workdir DIR --scheme int8|int4|int4-g128|nf4|fp8|w8a8|gptq-int4|int2-g64|gptq-int2-g64 \
        --out DIR2 [--calibration-batches 8] [--quantize-embeddings]

DIR2 gets config.json (the source's), quantization.json (the marker: scheme, source, step, array layout),
quantized/weights.npz (the quantized state, sub-byte values packed) and quantize_report.json (eval loss, bits per
byte and weight memory of both models); DIR is only read. `sparseformer eval` and `sample` run DIR2 (loading
re-applies the scheme's structure and fills it with the stored arrays). Every flag is checked, and DIR2 must not
exist, before any work starts; DIR2 is built aside and renamed into place when complete.
"""

import argparse
import json
import os
import shutil

from sparseformer.train.compression import workdirs

REPORT_FILE = "quantize_report.json"


def add_parser(commands) -> None:
  quantize = commands.add_parser("quantize", help="post-training quantization (qwix) of a run's latest checkpoint "
                                 "into a new workdir, evaluated beside the original")
  quantize.add_argument("--workdir", required=True, help="the trained run (only read)")
  quantize.add_argument("--out", required=True, help="new workdir for the quantized model (must not exist)")
  quantize.add_argument("--scheme", required=True, help="int8 | int4 | int4-g128 | nf4 | fp8 | w8a8 | gptq-int4 | "
                        "int2-g64 | gptq-int2-g64 (train/compression/quantize_config.py)")
  quantize.add_argument("--calibration-batches", type=int, default=8, help="training batches for GPTQ's Hessians")
  quantize.add_argument("--quantize-embeddings", action="store_true",
                        help="also quantize the embedding table / output head (kept float by default)")


def check_args(args: argparse.Namespace) -> None:
  """Flag checks that need no model: ValueError naming the flag and the fix."""
  from sparseformer.train.compression import quantize_config, quantize_store  # pylint: disable=import-outside-toplevel

  quantize_config.get_scheme(args.scheme)
  if args.calibration_batches < 1:
    raise ValueError(f"--calibration-batches {args.calibration_batches} must be >= 1.")
  workdirs.check_source_and_out(args.workdir, args.out, "quantize")
  if quantize_store.is_quantized_workdir(args.workdir):
    raise ValueError(f"--workdir {args.workdir} is already quantized; quantize the float run it came from.")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  check_args(args)
  from sparseformer.train import trainer
  from sparseformer.train.compression import quantize, quantize_config

  config = trainer.load_run_config(args.workdir)
  scheme = quantize_config.get_scheme(args.scheme)
  quantize.check_tiles(config.model, scheme)
  if config.data.resolved_source == "task":
    raise ValueError("--workdir holds a task run; quantize reports bits per byte of a text model.")
  out = os.path.abspath(args.out)
  partial = f"{out}.partial-{os.getpid()}"
  try:
    report = _quantize_workdir(config, scheme, args, os.path.abspath(args.workdir), partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.lexists(out):
    shutil.rmtree(partial, ignore_errors=True)
    raise ValueError(f"--out {args.out} appeared while quantizing; nothing was written there.")
  os.rename(partial, out)
  trainer.log(format_table(report))
  trainer.log(f"Quantized model written to {out} (report: {os.path.join(out, REPORT_FILE)}); "
              f"`sparseformer eval --workdir {out}` runs it.")
  return 0


def _quantize_workdir(config, scheme, args, source: str, partial: str, out: str) -> dict:
  # pylint: disable=import-outside-toplevel,protected-access
  import platform

  import jax
  import numpy as np

  from sparseformer.train import data as data_lib
  from sparseformer.train import trainer
  from sparseformer.train.compression import quantize, quantize_run, quantize_store

  corpus = data_lib.load_source(config.data)
  run = trainer.open_run(config, source, require_checkpoint=True)
  try:
    val_sets = trainer._global_val_sets(config, corpus, run)
    if not val_sets[""]:
      raise ValueError("The validation split holds no full batch; the quantized model cannot be evaluated.")
    calibration = None
    if scheme.gptq:
      index, count = data_lib.local_batch_shard(run.batch_sharding, config.data)
      batches = data_lib.make_train_batches(config.data, corpus, index, count)
      calibration = [np.asarray(next(batches)["inputs"]) for _ in range(args.calibration_batches)]
    original = trainer.evaluate(run, val_sets)
    step = int(run.state.step)
    params, extra = run.state.params, run.state.extra
  finally:
    run.checkpointer.close()

  quantized = quantize.quantize_model(config.model, scheme, params, extra, seq_len=config.data.seq_len,
                                      calibration=calibration, quantize_embeddings=args.quantize_embeddings)
  os.makedirs(partial)
  shutil.copyfile(os.path.join(source, "config.json"), os.path.join(partial, "config.json"))
  marker = {"scheme": args.scheme, "source": source, "step": step,
            "quantize_embeddings": bool(args.quantize_embeddings)}
  leaves = quantize.stored_leaves(quantized)
  arrays = quantize_store.save(partial, leaves, marker)
  loaded = quantize_run.open_quantized(config, partial)  # evaluates what was written, not what is in memory
  result = trainer.evaluate(loaded, val_sets)
  memory = quantize.weight_memory(params, leaves, arrays)
  report = {
      "scheme": args.scheme, "source": source, "out": out, "step": step,
      "calibration_batches": args.calibration_batches if scheme.gptq else 0,
      "quantize_embeddings": bool(args.quantize_embeddings),
      "gptq_weights": quantized.gptq_weights,
      "unquantized_matrices": quantized.unquantized,
      "original": original, "quantized": result,
      "delta_loss": result["loss"] - original["loss"],
      "delta_bits_per_byte": result["bits_per_byte"] - original["bits_per_byte"],
      "memory": memory,
      "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                  "devices": [str(device) for device in jax.devices()]},
  }
  with open(os.path.join(partial, REPORT_FILE), "w", encoding="utf-8") as file:
    json.dump(report, file, indent=2)
  return report


def format_table(report: dict) -> str:
  """The report as a small table: loss, bits per byte and weight memory, original vs quantized."""
  memory, original, quantized = report["memory"], report["original"], report["quantized"]
  rows = [("", "original", f"quantized ({report['scheme']})", "delta"),
          ("eval loss (nats/token)", f"{original['loss']:.4f}", f"{quantized['loss']:.4f}",
           f"{report['delta_loss']:+.4f}"),
          ("bits per byte", f"{original['bits_per_byte']:.4f}", f"{quantized['bits_per_byte']:.4f}",
           f"{report['delta_bits_per_byte']:+.4f}"),
          ("quantized weights (bytes)", f"{memory['covered_float_bytes']:,}", f"{memory['covered_stored_bytes']:,}",
           f"x{memory['covered_float_bytes'] / max(memory['covered_stored_bytes'], 1):.2f} smaller"),
          ("whole model (bytes)", f"{memory['model_float_bytes']:,}", f"{memory['model_stored_bytes']:,}",
           f"x{memory['model_float_bytes'] / max(memory['model_stored_bytes'], 1):.2f} smaller")]
  widths = [max(len(row[column]) for row in rows) for column in range(4)]
  lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
  if report["unquantized_matrices"]:
    lines.append("left float: " + ", ".join(report["unquantized_matrices"]))
  return "\n".join(lines)

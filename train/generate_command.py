"""`sparseformer sample`: text from a run's latest checkpoint through the KV cache (train/generate.py).

    sparseformer sample --workdir runs/quickstart --prompt "def " --tokens 200 --temperature 0.8 --top-p 0.95
    sparseformer sample --workdir runs/quickstart --prompts-file prompts.txt --temperature 0   # one batch, greedy

--prompts-file holds one prompt per line (read as bytes, so any encoding works; a trailing newline does not add
an empty prompt, an empty line in the middle is an empty prompt that starts a new document). All prompts decode
as one batch. Output: one prompt -> its text; several -> each text under a `=== prompt i` header line.
"""

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of `sparseformer sample` (cli.py builds the subparser, this module owns its flags)."""
  parser.add_argument("--workdir", required=True)
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--prompt", default=None, help="one prompt (default: empty, a new document)")
  source.add_argument("--prompts-file", help="a file of prompts, one per line, generated as one batch")
  parser.add_argument("--tokens", type=int, default=200, help="tokens to generate per prompt")
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0 = full vocabulary")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = no nucleus filter")
  parser.add_argument("--seed", type=int, default=0)


def read_prompts(args: argparse.Namespace) -> list[bytes]:
  """The prompts as bytes: --prompt (argv bytes recovered exactly) or the lines of --prompts-file."""
  if args.prompts_file is None:
    return [os.fsencode(args.prompt or "")]
  if not os.path.isfile(args.prompts_file):
    raise FileNotFoundError(f"--prompts-file {args.prompts_file} is not a file.")
  with open(args.prompts_file, "rb") as file:
    lines = file.read().split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  if not lines:
    raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt; write one prompt per line.")
  return [line.removesuffix(b"\r") for line in lines]


def run(args: argparse.Namespace) -> int:
  """Checks the settings and prompts, then loads the checkpoint and prints the texts."""
  # pylint: disable=import-outside-toplevel  (cli.py imports this module for its flags: JAX loads only here)
  import jax

  from sparseformer.train import generate, trainer

  generate.check_settings(max_new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)
  prompts = read_prompts(args)
  config = trainer.load_run_config(args.workdir)
  generate.prepare_prompts([generate.prompt_ids(p) for p in prompts], args.tokens,
                           config.model.max_seq_len)  # a prompt too long: the error before the checkpoint loads
  run_ = trainer.open_run(config, args.workdir, require_checkpoint=True)
  try:
    with jax.set_mesh(run_.mesh):
      texts = generate.generate_text(run_.model(), prompts, max_new_tokens=args.tokens,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     seed=args.seed)
  finally:
    run_.checkpointer.close()
  out = sys.stdout
  for index, text in enumerate(texts):
    if len(texts) > 1:
      out.write(f"=== prompt {index}\n")
    out.write(text.encode(out.encoding or "utf-8", errors="replace").decode(out.encoding or "utf-8") + "\n")
  out.flush()
  return 0

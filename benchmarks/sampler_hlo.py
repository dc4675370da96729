"""Compiled programs of today's sampler and the pre-refactor T5-only one.

Compiles `ketchup_jax.models.sampling.sample` and the same function at git
revision `--rev` (default `rollout.OLD_SAMPLER_REV`, the commit before the
model-family refactor; read with `git show`, run on today's T5 model code)
for one random T5 checkpoint, and compares the optimised HLO: the number of
instructions of each (opcode, result shape). Equal counts mean the refactor
left the T5 sampling program as it was (names and source locations aside),
so the two can differ in speed only by noise. Prints one JSON line.

    python -m benchmarks.sampler_hlo [--shape t5-small] [--batch 8]
        [--new_tokens 64] [--rev 4afceea^]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile

from benchmarks import common
from benchmarks import rollout

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+) ([\w\-]+)\(")


def op_counts(hlo_text: str) -> collections.Counter:
  """(opcode, result shape) -> instructions of an HLO module's text."""
  counts: collections.Counter = collections.Counter()
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      counts[f"{m.group(2)} {m.group(1)}"] += 1
  return counts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="t5-small",
                      choices=list(common.T5_SHAPES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--src_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--rev", default=rollout.OLD_SAMPLER_REV)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ketchup_jax import models  # pylint: disable=g-import-not-at-top
  from ketchup_jax.models import sampling  # pylint: disable=g-import-not-at-top

  old = rollout.load_old_sampler(args.rev)
  if old is None:
    raise SystemExit(f"--rev={args.rev}: its sampler cannot be read")
  with tempfile.TemporaryDirectory() as d:
    common.save_random(args.shape, d, seed=0)
    lm = models.load(d, dtype=jnp.float32)
  config = common.no_eos(lm.config)
  ids = jnp.ones((args.batch, args.src_len), jnp.int32)
  static = ("config", "mesh", "rules", "max_new_tokens")
  counts = {}
  for name, fn in (("old", old.sample), ("new", sampling.sample)):
    compiled = jax.jit(fn, static_argnames=static).lower(
        lm.params, config, ids, ids, jax.random.key(1),
        max_new_tokens=args.new_tokens, temperature=1.0).compile()
    counts[name] = op_counts(compiled.as_text())
  print(json.dumps({
      "shape": args.shape, "batch": args.batch, "src_len": args.src_len,
      "new_tokens": args.new_tokens, "rev": args.rev,
      "old_instructions": sum(counts["old"].values()),
      "new_instructions": sum(counts["new"].values()),
      "only_old": dict(counts["old"] - counts["new"]),
      "only_new": dict(counts["new"] - counts["old"]),
      "same_program": counts["old"] == counts["new"]}))


if __name__ == "__main__":
  main()

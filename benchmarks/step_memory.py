"""Compile-time memory of the RL step and the word-level KD step, chunked or not.

Each case is `jax.jit(step, donate_argnums=0).lower(...).compile()` on
abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated or run), and
its `memory_analysis()`: temp bytes (XLA's scratch buffers: activations,
logits, gradients, ...), argument bytes (state, teacher, batch) and output
bytes. Shapes: T5 v1.0 T5-base student and T5-large teacher (tied, rescaled
LM head), and the decoder-only Qwen2.5-0.5B student and Qwen2.5-1.5B teacher
(tied), float32 compute, at vocabularies 32,000 and 151,936 (Qwen's), B = 8,
prompt (source) and target positions 512, `StepModels.logits_chunk` 0 (whole
logits) and on. The RL step is `rollouts.rl_step` (rollout of 512 tokens, teacher
Q-values, K = 4 returns, student forward + backward, AdamW); the KD step is
`steps.word_kd_step` (forward KL on gold targets).

Target (printed, not asserted): with chunking on, the temp memory added by
going from 32,000 to 151,936 entries is under a quarter of one float32
[B, T, V] tensor at 151,936. What chunking cannot remove are arrays of the
size of the student's [V, E] embedding: its float32 gradient; `emb grad MiB`
is the growth of one float32 [V, E]. `--phases` compiles the T5 RL step's
rollout, teacher pass and update alone, to show which one grows.

    python -m benchmarks.step_memory [--chunks 16] [--families t5,decoder]
        [--phases] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from ketchup_jax.models import config as config_lib
from ketchup_jax.models import decoder_config
from ketchup_jax.models import family
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps

VOCABS = (32000, 151936)
QUICK_VOCABS = (512, 2048)
# (student, teacher) per model family, full and --quick.
PAIRS = {"t5": ("t5-base", "t5-large"), "decoder": ("qwen2.5-0.5b",
                                                    "qwen2.5-1.5b")}
QUICK_PAIRS = {"t5": ("t5-tiny", "t5-tiny"), "decoder": ("qwen2-tiny",
                                                         "qwen2-tiny")}


def _config(name: str, **kw: Any) -> family.Config:
  if name in decoder_config.DECODER_SIZES:
    return decoder_config.get_decoder_config(name, **kw)
  return config_lib.get_config(name, **kw)


def _family(name: str) -> str:
  return "decoder" if name in decoder_config.DECODER_SIZES else "t5"


def _embed_dim(name: str) -> int:
  config = _config(name)
  return config.d_model if _family(name) == "t5" else config.hidden_size


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _setup(student_name, teacher_name, vocab, batch, length, chunk, overrides):
  """Abstract state, teacher, batch and the static step arguments."""

  kw = dict(vocab_size=vocab, dtype=jnp.float32, **overrides)
  s_cfg = _config(student_name, **kw)
  t_cfg = _config(teacher_name, **kw)
  mods = steps.StepModels(student=s_cfg, teacher=t_cfg, logits_chunk=chunk)
  optim = state_lib.OptimConfig(steps=1000, learning_rate=1e-5)
  tx = state_lib.make_optimizer(optim)
  state = jax.eval_shape(functools.partial(state_lib.init_state, tx=tx,
                                           seed=0), family.param_shapes(s_cfg))
  teacher = _abstract(family.param_shapes(t_cfg))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  data = {"input_ids": ids, "attention_mask": ids,
          "example_mask": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  rl = rollouts.RLConfig(k=4, max_decode_len=length)
  return _abstract(state), teacher, data, mods, optim, rl


def measure_phases(student_name: str, teacher_name: str, vocab: int,
                   batch: int, length: int, chunk: int,
                   overrides: dict[str, Any]) -> list[dict[str, Any]]:
  """Temp bytes of the RL step's pieces, each compiled alone."""

  state, teacher, data, mods, optim, rl = _setup(
      student_name, teacher_name, vocab, batch, length, chunk, overrides)
  rng = jax.ShapeDtypeStruct((2,), "uint32")
  rollout = jax.eval_shape(functools.partial(
      rollouts.student_rollout, models=mods, rl=rl), state.params, data, rng)
  scored = jax.eval_shape(functools.partial(
      rollouts.score_rollout, models=mods, rl=rl), state.params, teacher, data,
                          rng)
  pieces = {
      "rollout": (functools.partial(rollouts.student_rollout, models=mods,
                                    rl=rl), (state.params, data, rng), ()),
      "teacher": (lambda t, b, r: rollouts.teacher_scores(
          t, b, r.actions, r.mask, r.finished, models=mods, rl=rl),
                  (teacher, data, rollout), ()),
      "update": (functools.partial(rollouts.rl_update, models=mods, optim=optim,
                                   rl=rl), (state, data, scored, rng), (0,)),
  }
  rows = []
  for name, (fn, args, donate) in pieces.items():
    mem = jax.jit(fn, donate_argnums=donate).lower(*args).compile(
        ).memory_analysis()
    rows.append({"phase": name, "vocab": vocab, "chunk": chunk,
                 "temp_bytes": int(mem.temp_size_in_bytes)})
  return rows


def measure(step: str, student_name: str, teacher_name: str, vocab: int,
            batch: int, length: int, chunk: int, overrides: dict[str, Any]
            ) -> dict[str, Any]:
  """One compiled step's memory_analysis, as a `cases` row."""

  state, teacher, data, mods, optim, rl = _setup(
      student_name, teacher_name, vocab, batch, length, chunk, overrides)
  if step == "rl":
    fn = functools.partial(rollouts.rl_step, models=mods, optim=optim, rl=rl)
  else:
    ids = data["input_ids"]
    data = dict(data, decoder_target_ids=ids, decoder_attention_mask=ids)
    fn = functools.partial(steps.word_kd_step, models=mods, optim=optim,
                           divergence="kl")
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(state, teacher,
                                                 data).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return {"name": f"{step}/{student_name}<-{teacher_name}/V{vocab}/chunk{chunk}",
          "step": step, "family": _family(student_name),
          "student": student_name,
          "teacher": teacher_name, "vocab": vocab, "batch": batch,
          "target_len": length, "chunk": chunk,
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "compile_s": round(seconds, 1)}


def targets(cases: list[dict[str, Any]], vocabs: tuple[int, int]
            ) -> list[dict[str, Any]]:
  """Per family, step and chunk: temp growth from the small to the large V."""
  small, large = vocabs
  by_key = {(c["family"], c["step"], c["chunk"], c["vocab"]): c
            for c in cases}
  rows = []
  for fam, step, chunk in sorted({(c["family"], c["step"], c["chunk"])
                                  for c in cases}):
    lo = by_key[(fam, step, chunk, small)]
    hi = by_key[(fam, step, chunk, large)]
    one_logits = 4 * hi["batch"] * hi["target_len"] * large
    added = hi["temp_bytes"] - lo["temp_bytes"]
    rows.append({
        "family": fam, "step": step, "chunk": chunk,
        "added_temp_bytes": added, "one_f32_logits_bytes": one_logits,
        "added_over_logits": added / one_logits,
        # Unavoidable: the float32 gradient of the student's [V, E] embedding.
        "embedding_grad_growth_bytes": (4 * (large - small) *
                                        _embed_dim(hi["student"])),
        "target": "added < 0.25 x one float32 [B, T, V]",
        "met": bool(added < 0.25 * one_logits) if chunk else None,
    })
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_common_flags(parser)
  parser.add_argument("--chunks", default="16",
                      help="Comma-separated logits_chunk values of the chunked"
                      " cases (positions); each is compiled besides 0.")
  parser.add_argument("--families", default="t5,decoder",
                      help="Comma-separated: t5 (T5-base <- T5-large), decoder"
                      " (Qwen2.5-0.5B <- Qwen2.5-1.5B).")
  parser.add_argument("--phases", action="store_true",
                      help="Also compile the T5 RL step's rollout, teacher "
                      "pass and update alone (first chunk): where the temp "
                      "goes.")
  parser.add_argument("--steps", default="rl,word_kd",
                      help="Comma-separated: rl, word_kd.")
  args = parser.parse_args(argv)
  try:
    chunks = [int(c) for c in args.chunks.split(",") if c]
  except ValueError:
    chunks = []
  if not chunks or any(c < 1 for c in chunks):
    raise SystemExit(f"--chunks must be comma-separated ints >= 1, got "
                     f"{args.chunks!r}")
  chosen = [s for s in args.steps.split(",") if s]
  if not chosen or any(s not in ("rl", "word_kd") for s in chosen):
    raise SystemExit(f"--steps must be a comma-separated subset of rl,word_kd;"
                     f" got {args.steps!r}")
  families = [f for f in args.families.split(",") if f]
  if not families or any(f not in PAIRS for f in families):
    raise SystemExit(f"--families must be a comma-separated subset of "
                     f"{','.join(PAIRS)}; got {args.families!r}")
  if args.quick:
    pairs, batch, length, vocabs = QUICK_PAIRS, 2, 16, QUICK_VOCABS
    chunks = [min(c, 4) for c in chunks]
  else:
    pairs, batch, length, vocabs = PAIRS, 8, 512, VOCABS
  overrides: dict[str, Any] = {}
  cases = []
  for fam in families:
    student, teacher = pairs[fam]
    for step in chosen:
      for vocab in vocabs:
        for c in [0] + chunks:
          row = measure(step, student, teacher, vocab, batch, length, c,
                        overrides)
          print(f"compiled {row['name']} in {row['compile_s']} s",
                flush=True)
          cases.append(row)
  target_rows = targets(cases, vocabs)
  phase_rows = []
  if args.phases:
    student, teacher = pairs["t5"]
    for vocab in vocabs:
      phase_rows += measure_phases(student, teacher, vocab, batch, length,
                                   chunks[0], overrides)
    for row in phase_rows:
      row["temp_mib"] = row["temp_bytes"] / 2 ** 20
    common.print_table(
        f"T5 RL step pieces compiled alone, chunk {chunks[0]}",
        [("phase", "phase", ""), ("vocab", "vocab", "d"),
         ("temp_mib", "temp MiB", ".0f")], phase_rows)
    for row in phase_rows:
      del row["temp_mib"]
  mib = 2 ** 20
  for row in cases:
    for key in ("temp", "argument", "output"):
      row[f"{key}_mib"] = row[f"{key}_bytes"] / mib
  common.print_table(
      f"compiled step memory (memory_analysis), B={batch}, T={length}",
      [("student", "student", ""), ("step", "step", ""),
       ("vocab", "vocab", "d"), ("chunk", "chunk", "d"),
       ("temp_mib", "temp MiB", ".0f"), ("argument_mib", "args MiB", ".0f"),
       ("output_mib", "output MiB", ".0f"), ("compile_s", "compile s", ".1f")],
      cases)
  for row in target_rows:
    row["added_mib"] = row["added_temp_bytes"] / mib
    row["logits_mib"] = row["one_f32_logits_bytes"] / mib
    row["emb_grad_mib"] = row["embedding_grad_growth_bytes"] / mib
    row["met_str"] = {None: "-", True: "yes", False: "NO"}[row["met"]]
  common.print_table(
      f"temp growth V={vocabs[0]} -> {vocabs[1]} (target with chunking: "
      f"< 0.25 x one float32 [B, T, V])",
      [("family", "family", ""), ("step", "step", ""), ("chunk", "chunk", "d"),
       ("added_mib", "added MiB", ".0f"),
       ("logits_mib", "[B,T,V] MiB", ".0f"),
       ("added_over_logits", "ratio", ".3f"),
       ("emb_grad_mib", "emb grad MiB", ".0f"), ("met_str", "met", "")],
      target_rows)
  for rows in (cases, target_rows):
    for row in rows:
      for key in [k for k in row if k.endswith("_mib") or k == "met_str"]:
        del row[key]
  common.write_json("step_memory", {
      "machine": common.machine_info(args.device),
      "cases": cases, "targets": target_rows,
      "rl_phases": phase_rows}, args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

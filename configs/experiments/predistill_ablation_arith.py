"""Experiment (iii) on the embedded GSM8K-style `arith` task.

    nice -n 15 python -m ketchup_jax.sweep \
        --config=configs/experiments/predistill_ablation_arith.py \
        --workdir=runs/predistill_ablation_arith

KETCHUP (K=4) from the SeqKD pre-distilled student and from its random
initialisation, one seed, the CPU-sized budget of common.arith_base (teacher
400 steps, SeqKD 100, RL 30 updates of 16 rollouts of up to 104 tokens), plus
the per-K diagnostics of the pre-distilled student (8 minibatches of 16).
"""

from configs.experiments import common


def get_config():
  c = common.sweep(common.arith_base(),
                   title="With and without pre-distillation on arith "
                   "(experiment iii)")
  c.methods = ("llmr", "ketchup")
  c.ks = (4,)
  c.seeds = (0,)
  c.scratch_ks = (4,)
  c.diagnostics.minibatches = 8
  return c

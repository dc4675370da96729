"""Experiment (iii): KETCHUP (K=4) with and without pre-distillation.

    nice -n 15 python -m ketchup_jax.sweep \
        --config=configs/experiments/predistill_ablation.py \
        --workdir=runs/predistill_ablation [--config.reuse_from=runs/k_sweep]

Task numbers_en_nl. The same RL budget from the SeqKD pre-distilled student
and from the random initialisation that pre-distillation started from
(SPEC §4: "RL without it starts from noise and barely moves").
"""

from configs.experiments import common


def get_config():
  c = common.sweep(common.numbers_base(),
                   title="With and without pre-distillation on numbers_en_nl "
                   "(experiment iii)")
  c.methods = ("ketchup",)
  c.ks = (4,)
  c.scratch_ks = (4,)
  c.diagnostics.minibatches = 0
  return c

"""Experiment (i): LLMR (K=1) vs KETCHUP (K=4), variances over training.

    nice -n 15 python -m ketchup_jax.sweep \
        --config=configs/experiments/variance_over_training.py \
        --workdir=runs/variance_over_training \
        [--config.reuse_from=runs/k_sweep]

Task numbers_en_nl. Every 10 RL steps (and at step 0) the RL stage measures,
at its current parameters, the policy-gradient variance and the return
variance of its own K over 8 fresh minibatches of 32 rollouts
(config.rl.diag_every; logged to metrics.jsonl as rl_k<K>_diag), plotted
against the step. With reuse_from it takes the teacher and pre-distilled
students of the K sweep (same settings, checked) instead of training them.
"""

from configs.experiments import common


def get_config():
  base = common.numbers_base()
  base.rl.diag_every = 10
  base.rl.diag_minibatches = 8
  c = common.sweep(base, title="LLMR vs KETCHUP over training on "
                   "numbers_en_nl (experiment i)")
  c.methods = ("llmr", "ketchup")
  c.ks = (4,)
  c.diagnostics.minibatches = 0  # the K sweep has the per-K diagnostics
  return c

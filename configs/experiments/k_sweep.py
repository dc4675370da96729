"""Experiment (ii): K in {1, 2, 4, 8, 16} and the classic objectives, 3 seeds.

    nice -n 15 python -m ketchup_jax.sweep \
        --config=configs/experiments/k_sweep.py --workdir=runs/k_sweep

Task numbers_en_nl (embedded). Test metric vs K, gradient variance and bias
vs K (16 minibatches of 32 rollouts, full gradient, per seed), and the
paper-shaped table: SeqKD / KL / JS / TVD / LLMR / KETCHUP.
"""

from configs.experiments import common


def get_config():
  c = common.sweep(common.numbers_base(),
                   title="K sweep on numbers_en_nl (experiment ii)")
  c.methods = ("seqkd", "kl", "js", "tvd", "llmr", "ketchup")
  c.ks = (2, 4, 8, 16)
  return c

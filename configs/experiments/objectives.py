"""The field's on-policy objectives beside LLMR / KETCHUP (SPEC §6), 3 seeds.

    nice -n 15 python -m ketchup_jax.sweep \
        --config=configs/experiments/objectives.py --workdir=runs/objectives \
        [--config.reuse_from=runs/k_sweep]

Task numbers_en_nl, the setting of the K sweep (configs/experiments/common.py):
from each seed's pre-distilled student, with the same budget and data order,
LLMR (K=1), KETCHUP (K=4), the soft value (K=1 and K=4), the reverse-KL
reward with the immediate reward (gamma = 0) and the undiscounted
reward-to-go (gamma = 1), the experimental K-step reverse KL (K=4,
gamma = 1: the gamma = 1 run restricted to the K-step chain) and GKD (lambda = 0.5, beta = 0.5, student samples at
temperature 1 of the RL rollouts' length), next to SeqKD continued. The
diagnostics table is LLMR's per-K one; `python -m ketchup_jax.diagnostics
--rewards=llmr,reverse_kl,reverse_kl_kstep` compares the objectives'
variances on the same rollouts.
"""

from configs.experiments import common


def get_config():
  c = common.sweep(common.numbers_base(),
                   title="On-policy objectives on numbers_en_nl (SPEC §6)")
  c.methods = ("seqkd", "gkd", "llmr", "ketchup", "soft", "reverse_kl",
               "reverse_kl_kstep")
  c.ks = (4,)
  c.reverse_kl_gammas = (0.0, 1.0)
  c.kstep_gamma = 1.0
  c.diagnostics.minibatches = 0  # the K sweep has the per-K diagnostics
  return c

"""Issue 13 on long rollouts: configs/numbers_long.py (byte-level, ~32 tokens).

    python -m ketchup_jax.sweep --config=configs/experiments/long_ablation.py \
        --workdir=runs/long_ablation --config.seeds=0

Teacher (1200 SFT steps, the best of 12 validations kept) and SeqKD
pre-distilled students as in configs/numbers_long.py; then, from each seed's
student with the same budget (150 updates of 32 rollouts, validation every 8
updates on 256 examples, best kept): SeqKD continued, LLMR, KETCHUP K = 4 and
16 with the reference recipe of configs/experiments/recipe_ablation.py
(temperature 1, no weight, no baseline, lr 1e-5, clip 1), and three
variants at K = 1 and 4: the pi-weighted loss (`refcompat`, the demo's
recipe), the authors' recipe, the state-value baseline, lr 1e-6, and Adam
epsilon 1e-3.
"""

import ml_collections

from configs import numbers_long
from configs.experiments import common


def get_config():
  base = numbers_long.get_config()
  base.rl.ks = ()
  # The reference recipe of recipe_ablation.py, pinned (configs/demo.py,
  # which numbers_long starts from, runs the authors' recipe).
  base.rl.weight = "none"
  base.rl.baseline = "none"
  base.rl.temperature = 1.0
  base.rl.max_grad_norm = 1.0
  base.rl.learning_rate = 1e-5
  base.rl.schedule = "constant"
  c = common.sweep(base, title="RL recipes on long rollouts (numbers_long)")
  c.methods = ("seqkd", "llmr", "ketchup")
  c.ks = (4, 16)
  rl = lambda **kw: {"rl": kw}
  c.variants = ml_collections.ConfigDict({
      "refcompat": rl(weight="reference_compat"),
      "authors": rl(temperature=0.0, weight="reference_compat",
                    max_grad_norm=0.0),
      "value_baseline": rl(baseline="value"),
      # Controls for "any update of the converged student hurts": a 10x
      # smaller step, and Adam's epsilon large enough that near-zero
      # gradients stay near-zero steps.
      "lr1e-6": rl(learning_rate=1e-6),
      "eps1e-3": rl(eps=1e-3),
  })
  c.variant_ks = (1, 4)
  c.diagnostics.minibatches = 0
  return c

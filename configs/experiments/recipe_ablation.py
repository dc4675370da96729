"""Issue 13's recipe ablation on the demo's task and models, 3 seeds.

    python -m ketchup_jax.sweep --config=configs/experiments/recipe_ablation.py \
        --workdir=runs/recipe_ablation --config.seeds=0
    python -m ketchup_jax.sweep \
        --config=configs/experiments/recipe_ablation.py:core \
        --workdir=runs/recipe_ablation --config.seeds=0,1,2
    python -m ketchup_jax.sweep \
        --config=configs/experiments/recipe_ablation.py:k \
        --workdir=runs/recipe_ablation --config.seeds=0,1,2

The teacher, tokenizer and pre-distillation are `make demo`'s (configs/demo.py;
seed 0 is the demo's own pre-distilled student). Every RL run starts from its
seed's pre-distilled student with the same budget (150 updates of 32
rollouts), the same data order and the same validation: greedy decoding of
512 validation examples every 8 updates, the best update exported (the start
never competes), reported on the 1047 test examples.

The reference recipe (`base.rl`): rollouts sampled at temperature 1, no
weight, no baseline, AdamW lr 1e-5 constant, gradient clipping 1, best
selection. Each variant changes one factor (or, `authors`, the four settings
of the authors' code at once), at K = 1 (LLMR) and K = 4 (KETCHUP).
"""

import ml_collections

from configs import demo
from configs.experiments import common


def recipe_base() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.rl.ks = ()
  c.rl.steps = 150
  c.rl.batch_size = 32
  c.rl.learning_rate = 1e-5
  c.rl.schedule = "constant"
  c.rl.max_grad_norm = 1.0
  c.rl.temperature = 1.0
  c.rl.weight = "none"
  c.rl.baseline = "none"
  c.rl.eval_every = 8
  c.rl.select = "best"
  c.validation.max_examples = 512
  # One padded shape per stage: one compile each.
  c.source_buckets = (24,)
  c.target_buckets = (16,)
  c.log_every = 50
  return c


# The factors run on every seed (`:core`); the rest ran on seed 0 only.
CORE = ("refcompat", "authors", "teacher_expected", "value_baseline",
        "lr1e-4", "last")


def variants(which: str = "all") -> ml_collections.ConfigDict:
  rl = lambda **kw: {"rl": kw}
  every = {
      "t0": rl(temperature=0.0),
      "refcompat": rl(weight="reference_compat"),
      "teacher_expected": rl(baseline="teacher_expected"),
      "value_baseline": rl(baseline="value"),
      "lr1e-6": rl(learning_rate=1e-6),
      "lr3e-6": rl(learning_rate=3e-6),
      "lr1e-4": rl(learning_rate=1e-4),
      "noclip": rl(max_grad_norm=0.0),
      "last": rl(select="last"),
      # SPEC §4.3: greedy, pi-weighted, no clipping (lr 1e-5 constant, no
      # baseline, c = 50 as in the reference).
      "authors": rl(temperature=0.0, weight="reference_compat",
                    max_grad_norm=0.0),
      # Two factors at once: the state-value baseline (A_t = -regret along
      # the chain, never positive) with a 10x step size.
      "value_lr1e-4": rl(baseline="value", learning_rate=1e-4),
  }
  if which == "core":
    every = {name: every[name] for name in CORE}
  elif which != "all":
    raise ValueError(f"recipe_ablation.py:<which> must be 'all' or 'core', "
                     f"got {which!r}")
  return ml_collections.ConfigDict(every)


def get_config(which: str = "all"):
  """`all` / `core`: the factor ablation; `k`: K and the word-level methods.

  `k` runs the reference recipe at K = 1, 2, 4, 8, 16 against SeqKD / KL / JS
  / TVD continued from the same student with the same budget and selection,
  in the same directory (the K = 1 and K = 4 runs are the ablation's).
  """
  c = common.sweep(recipe_base(), title="RL recipe ablation on numbers_en_nl "
                   "(demo models)")
  c.methods = ("llmr", "ketchup")
  c.ks = (4,)
  if which == "k":
    c.title = "K and the word-level objectives on numbers_en_nl (demo models)"
    c.methods = ("seqkd", "kl", "js", "tvd", "llmr", "ketchup")
    c.ks = (2, 4, 8, 16)
  else:
    c.variants = variants(which)
    c.variant_ks = (1, 4)
  c.diagnostics.minibatches = 0
  return c

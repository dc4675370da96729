"""A sweep in about a minute: the tiny models of configs/smoke.py, 2 x 2 runs."""

from configs import smoke
from configs.experiments import common


def get_config():
  base = smoke.get_config()
  base.mesh.data = 1
  c = common.sweep(base, title="smoke sweep")
  c.seeds = (0, 1)
  c.methods = ("kl", "llmr")
  c.diagnostics.ks = (1, 2)
  c.diagnostics.minibatches = 2
  return c

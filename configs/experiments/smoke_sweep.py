"""A sweep in about a minute: the tiny models of configs/smoke.py, 2 x 2 runs.

`configs/experiments/smoke_sweep.py:decoder` is the same sweep on the
decoder-only models of configs/smoke_decoder.py.
"""

from configs import smoke
from configs import smoke_decoder
from configs.experiments import common


def get_config(family: str = "t5"):
  bases = {"t5": smoke.get_config, "decoder": smoke_decoder.get_config}
  if family not in bases:
    raise ValueError(f"smoke_sweep.py:<family> takes one of {sorted(bases)}, "
                     f"got {family!r}")
  base = bases[family]()
  base.mesh.data = 1
  c = common.sweep(base, title=f"smoke sweep ({family})")
  c.seeds = (0, 1)
  c.methods = ("kl", "llmr")
  c.diagnostics.ks = (1, 2)
  c.diagnostics.minibatches = 2
  return c

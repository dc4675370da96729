"""The README's example runs and computes what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_k1_is_the_full_return():
  code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  scope = {}
  exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
  from ketchup_jax import returns
  q, v, mask = scope["q_taken"], scope["values"], scope["mask"]
  full = returns.full_returns(returns.one_step_rewards(q, v, mask), mask)
  np.testing.assert_allclose(scope["g_llmr"], full, atol=1e-4)
  assert np.isfinite(float(scope["loss"]))
  assert float(scope["n"]) == 16 + 9 + 4 + 1

"""The KETCHUP estimator on arrays: K-step returns trade variance for bias.

A random "teacher" scores rollouts sampled from its own softmax (so some
actions are its argmax and some are not). For each K the script prints the
batch variance of the returns and their bias against the full (K = 1) return,
all from one teacher pass. Runs in seconds on a laptop CPU:

    python examples/k_step_returns.py
"""

import jax
import jax.numpy as jnp

from ketchup_jax import returns


def main(batch: int = 256, length: int = 64, vocab: int = 512) -> None:
  key_logits, key_len, key_act = jax.random.split(jax.random.key(0), 3)
  # [batch, length, vocab] teacher logits, peaked enough that sampling often
  # agrees with the argmax.
  logits = 4.0 * jax.random.normal(key_logits, (batch, length, vocab))
  actions = jax.random.categorical(key_act, logits)  # [batch, length]
  lengths = jax.random.randint(key_len, (batch,), length // 2, length + 1)
  mask = jnp.arange(length)[None, :] < lengths[:, None]  # prefix masks

  q_taken, values = returns.teacher_q_values(logits, actions, mask)
  print(f"{batch} rollouts, lengths {int(lengths.min())}-{int(lengths.max())}, "
        f"vocab {vocab}; teacher-greedy actions: "
        f"{float(jnp.mean(q_taken == values, where=mask)):.0%}")
  print(f"{'K':>4} {'Var[Ĝ] (batch)':>15} {'mean Ĝ-G':>10} {'max Ĝ-G':>10}")
  for k in (1, 2, 4, 8, 16, 64):
    d = returns.return_diagnostics(q_taken, values, mask, k)
    print(f"{k:>4} {float(d['return_var']):>15.2f} "
          f"{float(d['bias_mean']):>10.2f} {float(d['bias_max']):>10.2f}")


if __name__ == "__main__":
  main()

"""Word-level distillation losses: divergences between teacher and student.

Per position, a divergence between the teacher's distribution p (no gradient)
and the student's q over the vocabulary, as a sum and a count over the mask
like every loss of `losses`: forward and reverse KL, Jensen-Shannon and total
variation (`distillation_loss`, SPEC §3's word-level baselines), and GKD's
generalised Jensen-Shannon divergence (SPEC §6, `generalized_jsd_loss`).
`distillation_loss_chunked` is the memory-light form of `distillation_loss`
(`chunked.map_logits`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ketchup_jax import checks
from ketchup_jax import chunked
from ketchup_jax import losses

Array = jax.Array
ArrayLike = Any

DIVERGENCES = ("kl", "rkl", "js", "tvd")


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
) -> tuple[Array, Array]:
  """Word-level distillation: a divergence between teacher p and student q.

  Per position, with p = softmax(teacher / tau) (no gradient) and
  q = softmax(student / tau):
    "kl":  KL(p || q)  = sum p (log p - log q)      (forward KL)
    "rkl": KL(q || p)  = sum q (log q - log p)      (reverse KL)
    "js":  (KL(p || M) + KL(q || M)) / 2,  M = (p + q) / 2
    "tvd": sum |p - q| / 2

  Args:
    student_logits: [B, T, V] float.
    teacher_logits: [B, T, V] float (bf16 is fine), same vocabulary.
    mask: [B, T] prefix mask.
    divergence: one of "kl", "rkl", "js", "tvd".
    temperature: tau > 0.

  Returns:
    (loss_sum, count): float32 scalars.
  """
  checks.check_choice("divergence", divergence, DIVERGENCES)
  _check_distillation_args(student_logits, teacher_logits, mask, temperature)
  return _distillation_loss(student_logits, teacher_logits, mask,
                            divergence=divergence,
                            temperature=float(temperature))


def _check_distillation_args(student_logits, teacher_logits, mask,
                             temperature) -> None:
  checks.check_rank("student_logits", student_logits, 3, "[B, T, V]")
  checks.check_rank("teacher_logits", teacher_logits, 3, "[B, T, V]")
  checks.check_float("student_logits", student_logits)
  checks.check_float("teacher_logits", teacher_logits)
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if s_shape[-1] != t_shape[-1]:
    raise ValueError(
        f"teacher and student vocabularies differ: teacher_logits has "
        f"{t_shape[-1]} entries, student_logits {s_shape[-1]}; they must share "
        f"one tokenizer")
  checks.check_same_shape({"student_logits": student_logits,
                            "teacher_logits": teacher_logits})
  checks.check_same_shape({
      "student_logits[..., 0]": jax.ShapeDtypeStruct(s_shape[:2], jnp.float32),
      "mask": mask})
  checks.check_prefix_mask("mask", mask)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _xlogy_ratio(p: Array, logp: Array, logr: Array) -> Array:
  """sum_v p (log p - log r), with 0 log 0 = 0."""
  return jnp.sum(jnp.where(p > 0, p * (logp - logr), 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("divergence", "temperature"))
def _distillation_loss(student_logits, teacher_logits, mask, *, divergence,
                       temperature):
  per_token = _token_divergence(student_logits, teacher_logits,
                                divergence=divergence, temperature=temperature)
  return losses.masked_sum(per_token, mask)


def distillation_loss_chunked(
    student_hidden: ArrayLike,
    student_head: chunked.Head,
    teacher_hidden: ArrayLike,
    teacher_head: chunked.Head,
    mask: ArrayLike,
    *,
    chunk: int,
    divergence: str = "kl",
    temperature: float = 1.0,
) -> tuple[Array, Array]:
  """`distillation_loss` of `project(student_hidden, student_head)` against
  `project(teacher_hidden, teacher_head)`, `chunk` positions at a time.

  Args:
    student_hidden, teacher_hidden: [B, T, E_s], [B, T, E_t] LM-head inputs.
    student_head, teacher_head: their LM heads (`t5.output_head`).
    mask, divergence, temperature: as in `distillation_loss`.
    chunk: positions per chunk (0 = all at once).

  Returns:
    (loss_sum, count): float32 scalars; only `[B, chunk, V]` blocks of either
    model's logits exist, in the backward pass too. The teacher gets no
    gradient.
  """
  checks.check_choice("divergence", divergence, DIVERGENCES)
  chunked.check_head("student_hidden", student_hidden, "student_head",
                     student_head)
  chunked.check_head("teacher_hidden", teacher_hidden, "teacher_head",
                     teacher_head)
  s_vocab, t_vocab = student_head.vocab_size, teacher_head.vocab_size
  if s_vocab != t_vocab:
    raise ValueError(
        f"teacher and student vocabularies differ: teacher_head has "
        f"{t_vocab} entries, student_head {s_vocab}; they must share one "
        f"tokenizer")
  positions = {
      "student_hidden[..., 0]": jax.ShapeDtypeStruct(
          jnp.shape(student_hidden)[:2], jnp.float32),
      "teacher_hidden[..., 0]": jax.ShapeDtypeStruct(
          jnp.shape(teacher_hidden)[:2], jnp.float32),
      "mask": mask}
  checks.check_same_shape(positions)
  checks.check_prefix_mask("mask", mask)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  teacher_hidden, teacher_head = jax.lax.stop_gradient(
      (teacher_hidden, teacher_head))
  per_token = chunked.map_logits(
      lambda z, ht, t_head: _token_divergence(
          z, chunked.project(ht, t_head), divergence=divergence,
          temperature=float(temperature)),
      student_hidden, student_head, (teacher_hidden,), chunk,
      consts=teacher_head)  # [B, T]
  return losses.masked_sum(per_token, mask)


def _token_divergence(student_logits, teacher_logits, *, divergence,
                      temperature):
  """[B, T, V] student and teacher logits -> [B, T] divergence."""
  logq = losses.log_softmax_f32(student_logits / temperature)  # [B, T, V]
  logp = jax.lax.stop_gradient(
      losses.log_softmax_f32(teacher_logits.astype(jnp.float32) / temperature))
  p, q = jnp.exp(logp), jnp.exp(logq)
  if divergence == "kl":
    per_token = _xlogy_ratio(p, logp, logq)
  elif divergence == "rkl":
    per_token = _xlogy_ratio(q, logq, logp)
  elif divergence == "js":
    logm = jnp.logaddexp(logp, logq) - jnp.log(2.0)
    per_token = 0.5 * (_xlogy_ratio(p, logp, logm) + _xlogy_ratio(q, logq, logm))
  else:
    per_token = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  return per_token


def generalized_jsd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike,
    *,
    beta: float,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
  """GKD's token-level generalised JSD (SPEC §6), as a sum and a count.

  Per position, with P = softmax(teacher / tau) (no gradient), Q =
  softmax(student / tau) and M = beta P + (1 - beta) Q:

      JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)

  Convention (P is the teacher, as in Agarwal et al. 2024 and SPEC §6):
  small beta is forward KL, beta near 1 is reverse KL. JSD_beta goes to 0 at
  both ends, as `beta KL(P || Q)` for beta -> 0 and `(1 - beta) KL(Q || P)`
  for beta -> 1; at exactly beta = 0 the loss is that limit's divergence,
  forward `KL(P || Q)`, and at beta = 1 reverse `KL(Q || P)` (as TRL's
  `generalized_jsd_loss` does), so the whole range [0, 1] is usable.

  Args:
    student_logits: [B, T, V] float.
    teacher_logits: [B, T, V] float, same vocabulary.
    mask: [B, T] prefix mask.
    beta: in [0, 1].
    temperature: tau > 0.

  Returns:
    (loss_sum, count): float32 scalars.
  """
  beta = check_beta(beta)
  _check_distillation_args(student_logits, teacher_logits, mask, temperature)
  return _generalized_jsd_loss(student_logits, teacher_logits, mask,
                               beta=beta, temperature=float(temperature))


def check_beta(beta: Any) -> float:
  """Returns GKD's `beta` as a float; raises unless it is in [0, 1]."""
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
      0.0 <= beta <= 1.0):
    raise ValueError(f"beta (the GKD JSD weight) must be a number in [0, 1] "
                     f"(0 = forward KL(teacher || student), 1 = reverse "
                     f"KL(student || teacher)), got {beta!r}")
  return float(beta)


def generalized_jsd(logp: Array, logq: Array, beta: float) -> Array:
  """Per-position JSD_beta of log-probabilities logp, logq [..., V] -> [...].

  P = exp(logp) is the teacher, Q = exp(logq) the student; beta = 0 and 1
  give forward KL(P || Q) and reverse KL(Q || P) (`generalized_jsd_loss`).
  """
  p, q = jnp.exp(logp), jnp.exp(logq)
  if beta == 0.0:
    return _xlogy_ratio(p, logp, logq)
  if beta == 1.0:
    return _xlogy_ratio(q, logq, logp)
  logm = jnp.logaddexp(logp + jnp.log(beta), logq + jnp.log1p(-beta))
  return (beta * _xlogy_ratio(p, logp, logm)
          + (1.0 - beta) * _xlogy_ratio(q, logq, logm))


@functools.partial(jax.jit, static_argnames=("beta", "temperature"))
def _generalized_jsd_loss(student_logits, teacher_logits, mask, *, beta,
                          temperature):
  logq = losses.log_softmax_f32(student_logits / temperature)  # [B, T, V]
  logp = jax.lax.stop_gradient(
      losses.log_softmax_f32(teacher_logits.astype(jnp.float32) / temperature))
  per_token = generalized_jsd(logp, logq, beta)  # [B, T]
  return losses.masked_sum(per_token, mask)

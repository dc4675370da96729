"""Train state and optimizer: the pieces every stage shares.

A `TrainState` is a pytree `(step, params, opt_state, rng)`: everything a run
needs to resume exactly. `step` counts micro-batches consumed (the data
iterator's position); with gradient accumulation the optimizer applies an
update every `grad_accum` of them (`optax.MultiSteps`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  """What a training stage checkpoints.

  Attributes:
    step: int32 scalar, micro-batches consumed so far.
    params: The trained model's parameter pytree.
    opt_state: The optimizer state (sharded like `params`).
    rng: uint32 [2] raw PRNG key, split once per step.
    skipped: int32 scalar, updates skipped because the loss or gradient was
      not finite.
    nonfinite_streak: int32 scalar, consecutive skipped updates up to now.
    last_finite_loss: float32 scalar, the loss of the last finite step.
    selection: The validation record (`validation.Selection`) of a stage
      that validates during training, else None.
    frozen: A LoRA student's frozen base parameters while a step runs (the
      trained `params` are then its adapters), else None. The training loop
      passes the base to its jitted step as its own, undonated argument and
      keeps `frozen` None in the state it holds and checkpoints.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array
  nonfinite_streak: jax.Array
  last_finite_loss: jax.Array
  selection: Any = None
  frozen: Any = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer settings of one stage (hashable: a static jit argument).

  Attributes:
    steps: Optimizer updates in the stage.
    learning_rate: Peak learning rate.
    schedule: "constant" or "linear" (linear decay to 0 after warmup).
    warmup_steps: Linear warmup updates from 0.
    weight_decay: AdamW decoupled weight decay.
    max_grad_norm: Global-norm gradient clipping; 0 disables.
    grad_accum: Micro-batches per update.
    b1, b2, eps: Adam moments.
  """
  steps: int
  learning_rate: float
  schedule: str = "linear"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  grad_accum: int = 1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> OptimConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: cfg[k] for k in fields if k in cfg})

  def __post_init__(self):
    for name in ("steps", "grad_accum"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not self.learning_rate > 0:
      raise ValueError(
          f"learning_rate must be > 0, got {self.learning_rate!r}")
    if self.schedule not in ("constant", "linear"):
      raise ValueError(
          f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got "
                       f"{self.warmup_steps!r}")
    if not self.eps > 0:
      raise ValueError(f"eps (Adam's epsilon) must be > 0, got {self.eps!r}")

  @property
  def micro_steps(self) -> int:
    """Micro-batches the stage consumes."""
    return self.steps * self.grad_accum


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup from 0, then constant or linear decay to 0."""
  after = cfg.steps - cfg.warmup_steps
  if cfg.schedule == "constant" or after == 0:
    decay = optax.constant_schedule(cfg.learning_rate)
  else:
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, after)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


# Leaves with more elements are clipped a block of rows at a time, in place.
CLIP_BLOCK_ELEMENTS = 1 << 22


def _in_place(fn: Any, t: jax.Array) -> jax.Array:
  """`fn(t)` for an elementwise `fn`, written over `t` block by block.

  XLA fuses an elementwise map of a large array into its readers; when the
  map has an expensive op (a divide) and several readers (AdamW's per-leaf
  fusions), it keeps the op's result as one more array of `t`'s size next to
  `t`. A loop over blocks of rows that updates its carry in place leaves one.
  """
  if t.ndim == 0 or t.size <= CLIP_BLOCK_ELEMENTS:
    return fn(t)
  rows = max(1, CLIP_BLOCK_ELEMENTS // (t.size // t.shape[0]))
  n = t.shape[0] // rows

  def body(i, t):
    block = jax.lax.dynamic_slice_in_dim(t, i * rows, rows)
    return jax.lax.dynamic_update_slice_in_dim(t, fn(block), i * rows, 0)

  t = jax.lax.fori_loop(0, n, body, t)
  if n * rows < t.shape[0]:
    t = t.at[n * rows:].set(fn(t[n * rows:]))
  return t


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` (the same arithmetic and state), in place.

  Each leaf `t` becomes `select(g_norm < max_norm, t, t / g_norm * max_norm)`
  as in optax, computed by `_in_place`: the clipped gradient of a [V, E]
  embedding takes no second [V, E] array.
  """
  inner = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    del params
    g_norm = optax.tree.norm(updates)
    trigger = jnp.squeeze(g_norm < max_norm)

    def clip(t):
      return jax.lax.select(trigger, t,
                            (t / g_norm.astype(t.dtype)) * max_norm)

    return jax.tree.map(lambda t: _in_place(clip, t), updates), state

  return optax.GradientTransformation(inner.init, update)


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with the schedule, optional clipping and accumulation.

  One object per (hashable) config: the training loop and every step it
  traces share it instead of each building the chain again.
  """
  parts = []
  if cfg.max_grad_norm > 0:
    parts.append(clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay))
  tx = optax.chain(*parts)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def init_state(params: Any, tx: optax.GradientTransformation,
               seed: int) -> TrainState:
  """A fresh state at step 0 (optimizer state placed like `params`)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed),
                    skipped=jnp.zeros((), jnp.int32),
                    nonfinite_streak=jnp.zeros((), jnp.int32),
                    last_finite_loss=jnp.full((), jnp.nan, jnp.float32))


def apply_gradients(state: TrainState, tx: optax.GradientTransformation,
                    grads: Any, loss: jax.Array, rng: jax.Array
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update, skipped (state untouched) if loss/grads are not finite.

  Returns the new state and `{"grad_norm", "skipped", "nonfinite_streak",
  "last_finite_loss"}`; `step` and `rng` always advance so a skipped batch is
  not retried forever.

  The skip is a `lax.cond` between the update and the old `(params,
  opt_state)`, not a `where(finite, new, old)` per leaf: with the state
  donated, the update then writes params and moments in place, where the
  per-leaf select kept a copy of each moment and the clipped gradient (three
  arrays of the largest parameter's size, e.g. a [V, E] embedding).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state, grads):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  params, opt_state = jax.lax.cond(
      finite, update, lambda params, opt_state, _: (params, opt_state),
      state.params, state.opt_state, grads)
  state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=rng,
      skipped=state.skipped + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      last_finite_loss=jnp.where(finite, loss.astype(jnp.float32),
                                 state.last_finite_loss))
  return state, {"grad_norm": grad_norm,
                 "skipped": (~finite).astype(jnp.float32),
                 "nonfinite_streak": state.nonfinite_streak,
                 "last_finite_loss": state.last_finite_loss}

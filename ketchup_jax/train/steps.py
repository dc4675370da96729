"""Pure step functions `(state, batch, ...) -> (state, metrics)` for each stage.

Each step is one micro-batch: forward, loss as `(sum, count)`, gradient, and
the optimizer update with the non-finite guard of `state.apply_gradients`.
Static arguments (model configs, option dataclasses, mesh) are hashable, so
`jax.jit(step, static_argnames=...)` compiles once per batch shape.

Stages:
  `supervised_step`  cross-entropy on the batch's targets (teacher SFT).
  `seqkd_step`       cross-entropy on the teacher's greedy outputs (SeqKD).
  `word_kd_step`     word-level KL / RKL / JS / TVD on the gold targets.
  `gkd_step`         GKD: generalised JSD on student samples or gold targets.

The RL step (rollout -> teacher Q-values -> K-step returns -> REINFORCE) is
`ketchup_jax.train.rollouts.rl_step`; it shares `StepModels` and `minimize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from ketchup_jax import chunked
from ketchup_jax import divergences
from ketchup_jax import losses
from ketchup_jax import partitioning
from ketchup_jax.models import family
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.models import sampling
from ketchup_jax.train import state as state_lib

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

@dataclasses.dataclass(frozen=True)
class StepModels:
  """Static description of the models a step uses.

  `logits_chunk` > 0 computes every loss and the teacher's Q-values from the
  LM heads' inputs that many positions at a time (`ketchup_jax.chunked`): no
  `[B, T, V]` float32 logits, forward or backward; the same numbers. 0 (the
  default) materialises the whole logits.

  A teacher and student of one family may have embeddings of different row
  counts (Qwen2.5 pads to 151,936 or 152,064 rows; the tokenizer has
  151,665): every logit, log-probability and sample is then over the first
  `logits_vocab` ids, the smaller count, which holds every id the shared
  tokenizer makes (`train.sources` checks both).

  `lora` set: the trained parameters (`state.params`) are the student's
  LoRA adapters and `state.frozen` its base; `student_params` gives what the
  student runs with.
  """
  student: family.Config
  teacher: family.Config | None = None
  mesh: Mesh | None = None
  rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES
  logits_chunk: int = 0
  lora: lora_lib.LoraStudent | None = None

  def student_params(self, trained: Any, frozen: Any) -> Any:
    """The student's parameters from the trained ones (and a LoRA base)."""
    if self.lora is None:
      return trained
    return self.lora.apply(trained, frozen, self.student)

  def __post_init__(self):
    chunked.check_chunk(self.logits_chunk)

  @property
  def logits_vocab(self) -> int | None:
    """The logits' width when the two models' rows differ, else None."""
    if self.teacher is None or (
        self.teacher.vocab_size == self.student.vocab_size):
      return None
    return min(self.teacher.vocab_size, self.student.vocab_size)

  def _cut(self, config: family.Config) -> int | None:
    """`logits_vocab` where `config` has more rows than it, else None."""
    vocab = self.logits_vocab
    return vocab if vocab is not None and config.vocab_size > vocab else None

  def score_head(self, params: Any, config: family.Config,
                 input_ids: jax.Array, attention_mask: jax.Array,
                 targets: jax.Array, target_mask: jax.Array
                 ) -> tuple[jax.Array, chunked.Head]:
    """`(hidden [B, T, E], head)`: `score` is `chunked.project` of them."""
    hidden = family.score_hidden(params, config, input_ids, attention_mask,
                                 targets, target_mask, mesh=self.mesh,
                                 rules=self.rules)
    head, vocab = family.output_head(params, config), self._cut(config)
    if vocab is not None:  # the first `vocab` rows (or columns) of the matrix
      head = dataclasses.replace(head, kernel=(
          head.kernel[:vocab] if head.vocab_first else head.kernel[:, :vocab]))
    return hidden, head

  def score(self, params: Any, config: family.Config, input_ids: jax.Array,
            attention_mask: jax.Array, targets: jax.Array,
            target_mask: jax.Array) -> jax.Array:
    """Teacher-forced float32 logits [B, T, V]: position t predicts targets[t].

    Any model family (`models.family.score`): T5 encodes the prompt and
    decodes the shifted targets; a decoder-only model reads prompt and
    targets as one sequence.

    Args:
      params: The model's parameters.
      config: Its config.
      input_ids: [B, S] the prompts (sources).
      attention_mask: [B, S] 1 on their real tokens.
      targets: [B, T] the tokens scored (gold targets or a rollout).
      target_mask: [B, T] 1 on the real ones.
    """
    logits = family.score(params, config, input_ids, attention_mask, targets,
                          target_mask, mesh=self.mesh, rules=self.rules)
    vocab = self._cut(config)
    return logits if vocab is None else logits[..., :vocab]

  def sample(self, params: Any, config: family.Config, batch: Batch,
             rng: jax.Array, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0) -> sampling.SampleOutput:
    return sampling.sample(
        params, config, batch["input_ids"], batch["attention_mask"], rng,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, mesh=self.mesh, rules=self.rules,
        vocab=self._cut(config))


def length_mask(lengths: jax.Array, length: int) -> jax.Array:
  """[B] lengths -> [B, length] int32 prefix mask."""
  return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


def minimize(state: state_lib.TrainState, optim: state_lib.OptimConfig,
             rng: jax.Array, loss_fn: Any, models: StepModels
             ) -> tuple[state_lib.TrainState, jax.Array, Any, Metrics]:
  """One guarded update; `loss_fn(student params) -> (loss, aux)`.

  The gradient is of `state.params`: with `models.lora`, the adapters only
  (`loss_fn` gets the base with them merged, `StepModels.student_params`;
  the base is a constant of the differentiation).
  """
  (loss, aux), grads = jax.value_and_grad(
      lambda p: loss_fn(models.student_params(p, state.frozen)),
      has_aux=True)(state.params)
  state, info = state_lib.apply_gradients(
      state, state_lib.make_optimizer(optim), grads, loss, rng)
  return state, loss, aux, info


def token_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.maximum(count, 1.0)


def _ce_update(state: state_lib.TrainState, models: StepModels,
               optim: state_lib.OptimConfig, batch: Batch, targets: jax.Array,
               target_mask: jax.Array, rng: jax.Array
               ) -> tuple[state_lib.TrainState, Metrics]:
  """Cross-entropy of the student on `targets`, and the update."""
  config = models.student
  args = (batch["input_ids"], batch["attention_mask"], targets, target_mask)

  def loss_fn(params):
    if models.logits_chunk:
      hidden, head = models.score_head(params, config, *args)
      total, count = losses.cross_entropy_loss_chunked(
          hidden, head, targets, target_mask, chunk=models.logits_chunk)
    else:
      logits = models.score(params, config, *args)  # [B, T, V]
      total, count = losses.cross_entropy_loss(logits, targets, target_mask)
    return token_mean(total, count), count

  state, loss, count, info = minimize(state, optim, rng, loss_fn, models)
  return state, {"loss": loss, "tokens": count, **info}


def supervised_step(state: state_lib.TrainState, batch: Batch, *,
                    models: StepModels, optim: state_lib.OptimConfig
                    ) -> tuple[state_lib.TrainState, Metrics]:
  """Cross-entropy on the batch's gold targets."""
  rng, _ = jax.random.split(state.rng)
  return _ce_update(state, models, optim, batch, batch["decoder_target_ids"],
                    batch["decoder_attention_mask"], rng)


def seqkd_targets(teacher_params: Any, batch: Batch, rng: jax.Array, *,
                  models: StepModels, max_decode_len: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The teacher's greedy outputs: tokens, target mask [B, T], done [B]."""
  out = models.sample(teacher_params, models.teacher, batch, rng,
                      max_new_tokens=max_decode_len)
  return out.tokens, length_mask(out.lengths, max_decode_len), out.done


def seqkd_update(state: state_lib.TrainState, batch: Batch, targets: jax.Array,
                 target_mask: jax.Array, done: jax.Array, *, models: StepModels,
                 optim: state_lib.OptimConfig
                 ) -> tuple[state_lib.TrainState, Metrics]:
  """The student's cross-entropy update on `seqkd_targets`' outputs."""
  rng, _ = jax.random.split(state.rng)
  state, metrics = _ce_update(state, models, optim, batch, targets,
                              target_mask, rng)
  metrics["teacher_finished"] = jnp.mean(done.astype(jnp.float32))
  return state, metrics


def seqkd_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
               *, models: StepModels, optim: state_lib.OptimConfig,
               max_decode_len: int) -> tuple[state_lib.TrainState, Metrics]:
  """SeqKD: cross-entropy on the teacher's greedy output for the sources."""
  rng, _ = jax.random.split(state.rng)
  targets, target_mask, done = seqkd_targets(
      teacher_params, batch, rng, models=models, max_decode_len=max_decode_len)
  return seqkd_update(state, batch, targets, target_mask, done, models=models,
                      optim=optim)


def word_kd_step(state: state_lib.TrainState, teacher_params: Any,
                 batch: Batch, *, models: StepModels,
                 optim: state_lib.OptimConfig, divergence: str
                 ) -> tuple[state_lib.TrainState, Metrics]:
  """Word-level distillation on the gold targets (teacher-forced)."""
  rng, _ = jax.random.split(state.rng)
  args = (batch["input_ids"], batch["attention_mask"],
          batch["decoder_target_ids"], batch["decoder_attention_mask"])
  mask = batch["decoder_attention_mask"]
  chunk = models.logits_chunk
  if chunk:
    teacher_head = jax.lax.stop_gradient(
        models.score_head(teacher_params, models.teacher, *args))
  else:
    teacher_logits = jax.lax.stop_gradient(
        models.score(teacher_params, models.teacher, *args))

  def loss_fn(params):
    if chunk:
      hidden, head = models.score_head(params, models.student, *args)
      total, count = divergences.distillation_loss_chunked(
          hidden, head, *teacher_head, mask, chunk=chunk,
          divergence=divergence)
    else:
      logits = models.score(params, models.student, *args)
      total, count = divergences.distillation_loss(
          logits, teacher_logits, mask, divergence=divergence)
    return token_mean(total, count), count

  state, loss, count, info = minimize(state, optim, rng, loss_fn, models)
  return state, {"loss": loss, "tokens": count, **info}


@dataclasses.dataclass(frozen=True)
class GKDConfig:
  """GKD (Agarwal et al. 2024; SPEC §6) options (hashable: static in jit).

  Each micro-batch, with probability `lmbda` (a coin from the step's key) the
  targets are the student's own samples of the sources, otherwise the batch's
  gold targets; the loss is the token-level generalised JSD between the
  teacher's and the student's full next-token distributions on those
  targets (`divergences.generalized_jsd_loss`).

  Attributes:
    lmbda: lambda in [0, 1], the fraction of batches on student samples
      (0 = always gold targets, 1 = always on-policy).
    beta: JSD weight in [0, 1]; P = teacher, Q = student,
      `JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)`,
      M = beta P + (1 - beta) Q: beta = 0 is forward KL(P || Q), beta = 1
      reverse KL(Q || P).
    temperature: Student sampling temperature (0 = greedy).
    max_decode_len: Length of the student's samples (new tokens).
  """
  lmbda: float = 0.5
  beta: float = 0.5
  temperature: float = 1.0
  max_decode_len: int = 64

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> GKDConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: cfg[name] for name in fields if name in cfg})

  def __post_init__(self):
    if isinstance(self.lmbda, bool) or not isinstance(
        self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
      raise ValueError(f"gkd.lmbda (lambda, the fraction of batches on "
                       f"student samples) must be a number in [0, 1], got "
                       f"{self.lmbda!r}")
    try:
      divergences.check_beta(self.beta)
    except ValueError as e:
      raise ValueError(f"gkd.{e}") from None
    if isinstance(self.temperature, bool) or not isinstance(
        self.temperature, (int, float)) or not self.temperature >= 0:
      raise ValueError(f"gkd.temperature must be a number >= 0 (0 = greedy), "
                       f"got {self.temperature!r}")
    if isinstance(self.max_decode_len, bool) or not isinstance(
        self.max_decode_len, int) or self.max_decode_len < 1:
      raise ValueError(f"gkd.max_decode_len must be an int >= 1, got "
                       f"{self.max_decode_len!r}")


def gkd_targets(params: Any, batch: Batch, rng: jax.Array, *, models: StepModels,
                gkd: GKDConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This batch's GKD targets: (targets [B, L], mask [B, L], on-policy).

  L = max(gold target length, gkd.max_decode_len): both kinds are padded to
  it so that one `lax.cond` picks between them and only the picked branch
  runs (the student samples only on on-policy batches). `on_policy` is a
  bool scalar, drawn with probability `gkd.lmbda`.
  """
  coin_rng, sample_rng = jax.random.split(rng)
  gold = batch["decoder_target_ids"]
  gold_len = gold.shape[1]
  length = max(gold_len, gkd.max_decode_len)

  def gold_targets():
    pad = ((0, 0), (0, length - gold_len))
    return (jnp.pad(gold, pad),
            jnp.pad(batch["decoder_attention_mask"], pad).astype(jnp.int32))

  def sampled():
    out = models.sample(params, models.student, batch, sample_rng,
                        max_new_tokens=gkd.max_decode_len,
                        temperature=gkd.temperature)
    mask = length_mask(out.lengths, gkd.max_decode_len) * (
        batch["example_mask"] > 0)[:, None]
    pad = ((0, 0), (0, length - gkd.max_decode_len))
    return (jnp.pad(out.tokens, pad).astype(gold.dtype),
            jnp.pad(mask, pad).astype(jnp.int32))

  if gkd.lmbda == 0.0:
    return (*gold_targets(), jnp.asarray(False))
  if gkd.lmbda == 1.0:
    return (*sampled(), jnp.asarray(True))
  on_policy = jax.random.bernoulli(coin_rng, gkd.lmbda)
  targets, mask = jax.lax.cond(on_policy, sampled, gold_targets)
  return targets, mask, on_policy


def gkd_step(state: state_lib.TrainState, teacher_params: Any, batch: Batch,
             *, models: StepModels, optim: state_lib.OptimConfig, gkd: GKDConfig
             ) -> tuple[state_lib.TrainState, Metrics]:
  """One GKD update: `gkd_targets`, then the generalised JSD on them."""
  rng, target_rng = jax.random.split(state.rng)
  targets, mask, on_policy = gkd_targets(
      models.student_params(jax.lax.stop_gradient(state.params),
                            state.frozen), batch, target_rng, models=models,
      gkd=gkd)
  args = (batch["input_ids"], batch["attention_mask"], targets, mask)
  teacher_logits = jax.lax.stop_gradient(
      models.score(teacher_params, models.teacher, *args))

  def loss_fn(params):
    logits = models.score(params, models.student, *args)
    total, count = divergences.generalized_jsd_loss(
        logits, teacher_logits, mask, beta=gkd.beta)
    return token_mean(total, count), count

  state, loss, count, info = minimize(state, optim, rng, loss_fn, models)
  return state, {"loss": loss, "tokens": count,
                 "on_policy": on_policy.astype(jnp.float32), **info}

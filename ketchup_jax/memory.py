"""Per-device memory of a KETCHUP RL step, computed from the model configs.

    python -m ketchup_jax.memory            # the README tables (Markdown)
    python -m ketchup_jax.memory --batch=32 --source_len=512 --target_len=128
    python -m ketchup_jax.memory --own_slice  # + the teacher on its own devices

What is counted, per device, with every parameter sharded by the logical rules
of `ketchup_jax.partitioning` over a pure-FSDP mesh (`fsdp` = all devices):

* teacher parameters, frozen, in `teacher_bytes` (2 = bfloat16) per value;
* student training state: float32 parameters + float32 gradients + AdamW's
  two float32 moments = 16 bytes per parameter;
* the largest single parameter all-gathered at full size (FSDP gathers one
  weight at a time for the matmul that uses it), teacher and student;
* activations of the largest of the step's three phases (`activation_bytes`):
  the rollout (decoder KV caches), the teacher's forward pass (no gradient:
  one layer alive at a time, plus its float32 logits), and the student's
  forward + backward pass, whose saved activations depend on `remat`;
* float32 logits of `logits_chunk` positions at a time (`config.logits_chunk`,
  `ketchup_jax.chunked`), or of all T positions when it is 0 (`logits_bytes`).

The parameter counts are exact (`param_count`, checked against
`t5.param_shapes` and PyTorch `transformers`). The activation terms are an
analytic estimate from the layer code (which tensors a backward pass keeps),
not a compiler's measurement; XLA fuses some of them away and adds buffers of
its own, so treat them as +-30 %.

`slice_table` does the same for the teacher on its own devices
(`config.teacher_mesh`, `ketchup_jax/train/teacher_slice.py`): the teacher's
parameters, gathered weights and forward pass on its devices only, the student
state, rollout and backward pass on the others.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

from absl import flags
import jax

from ketchup_jax import cli
from ketchup_jax import partitioning
from ketchup_jax.models import config as config_lib
from ketchup_jax.models import family
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.models.config import T5Config
from ketchup_jax.models.decoder_config import DECODER_SIZES
from ketchup_jax.models.decoder_config import DecoderConfig
from ketchup_jax.models.decoder_config import get_decoder_config

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  devices: int
  bytes_per_device: int


ACCELERATORS = (
    Accelerator("TPU v4-8 (4 chips x 32 GiB)", 4, 32 * GiB),
    Accelerator("TPU v5e-16 (16 chips x 16 GiB)", 16, 16 * GiB),
    Accelerator("8x H100 (80 GB each)", 8, 80 * 10 ** 9),
)


def param_count(config: family.Config) -> int:
  """Parameters of a T5 or a decoder from its hyperparameters (closed form).

  T5:
  Shared embedding V*d; an untied LM head d*V; per encoder layer 4 attention
  projections d*H (H = heads * d_kv), the feed-forward d*f*(3 gated / 2), two
  norm scales; per decoder layer the same plus cross-attention (4 d*H) and a
  third norm; one relative-position table (buckets x heads) and one final norm
  per stack.
  """
  if isinstance(config, DecoderConfig):
    return _decoder_param_count(config)
  d, f, v = config.d_model, config.d_ff, config.vocab_size
  inner = config.num_heads * config.d_kv
  attention = 4 * d * inner
  mlp = (3 if config.is_gated_act else 2) * d * f
  encoder_layer = attention + mlp + 2 * d
  decoder_layer = 2 * attention + mlp + 3 * d
  relpos = config.relative_attention_num_buckets * config.num_heads
  return (v * d + (0 if config.tie_word_embeddings else d * v) +
          config.num_layers * encoder_layer +
          config.num_decoder_layers * decoder_layer + 2 * (relpos + d))


def _decoder_param_count(config: DecoderConfig) -> int:
  """Decoder: embedding V*d, an untied head d*V; per layer q and o d*H*hd,
  k and v d*KV*hd (+ biases H*hd, 2 KV*hd with q/k/v bias), the gated MLP
  3 d*f, two norms (+ two hd q/k norms); one final norm."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q = config.num_attention_heads * config.head_dim
  kv = config.num_key_value_heads * config.head_dim
  layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d
  layer += (q + 2 * kv) * config.qkv_bias + 2 * config.head_dim * (
      config.qk_norm)
  return (v * d + (0 if config.tie_word_embeddings else d * v) +
          config.num_hidden_layers * layer + d)


class _MeshShape:
  """What `partitioning.logical_to_spec` reads of a mesh: its axis sizes."""

  def __init__(self, data: int = 1, fsdp: int = 1, tensor: int = 1):
    self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


@functools.lru_cache(maxsize=16)
def _axes_and_shapes(config: family.Config) -> tuple[tuple[Any, Any], ...]:
  """(logical axes, shape) of every parameter (tracing the model once)."""
  is_axes = lambda x: isinstance(x, tuple) and all(
      a is None or isinstance(a, str) for a in x)
  return tuple(zip(
      jax.tree.leaves(family.logical_axes(config), is_leaf=is_axes),
      jax.tree.leaves(family.param_shapes(config))))


def sharded_param_elements(config: family.Config, *, data: int = 1, fsdp: int = 1,
                           tensor: int = 1) -> tuple[int, int]:
  """(elements on one device, largest parameter's elements) under the rules.

  Uses the model's real parameter shapes and logical axes and the same
  `logical_to_spec` (divisibility fallback included) that places them.
  """
  mesh = _MeshShape(data, fsdp, tensor)
  per_device, largest = 0, 0
  for names, shape in _axes_and_shapes(config):
    spec = partitioning.logical_to_spec(names, shape=shape.shape, mesh=mesh)
    local = 1
    for size, mesh_axes in zip(shape.shape, tuple(spec) + (None,) * (
        len(shape.shape) - len(spec))):
      if mesh_axes is None:
        local *= size
      else:
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        local *= size // math.prod(mesh.shape[a] for a in mesh_axes)
    per_device += local
    largest = max(largest, math.prod(shape.shape))
  return per_device, largest


def _layer_working_set(config: T5Config, b: int, s: int, t: int, c: int
                       ) -> tuple[int, int]:
  """Bytes an encoder / a decoder layer keeps for its backward pass."""
  d, f, h = config.d_model, config.d_ff, config.num_heads
  inner = h * config.d_kv
  gate = 2 if config.is_gated_act else 1
  n, m = b * s, b * t
  # x, norm(x), residual, norm(x) before the MLP; q, k, v, attention output;
  # the MLP's input projections, activation and product; scores (float32)
  # and probabilities.
  encoder = (c * (4 * n * d + 4 * n * inner + (gate + 2) * n * f) +
             b * h * s * s * (4 + c))
  decoder = (c * (8 * m * d + 6 * m * inner + (gate + 2) * m * f) +
             b * h * (t * t + t * s) * (4 + c))
  return encoder, decoder


def _decoder_layer_working_set(config: DecoderConfig, b: int, length: int,
                               c: int) -> int:
  """Bytes a decoder layer keeps for its backward pass over `length` tokens.

  x, norm(x), residual, norm(x) before the MLP; q, k, v (KV heads) and the
  attention output; the gated MLP's two input projections, activation and
  product; causal scores (float32) and probabilities, every head.
  """
  d, f = config.hidden_size, config.intermediate_size
  q = config.num_attention_heads * config.head_dim
  kv = config.num_key_value_heads * config.head_dim
  n = b * length
  return (c * (4 * n * d + (2 * q + 2 * kv) * n + 4 * n * f) +
          b * config.num_attention_heads * length * length * (4 + c))


def _decoder_activation_bytes(config: DecoderConfig, *, batch: int,
                              length: int, target_len: int, remat: str,
                              compute_bytes: int, logits_chunk: int) -> int:
  """`activation_bytes` of a decoder on prompt + completion (`length`)."""
  b, c, d = batch, compute_bytes, config.hidden_size
  layer = _decoder_layer_working_set(config, b, length, c)
  # float32 logits, softmax and their gradient at the completion positions.
  logits = logits_bytes(config, batch=b, target_len=target_len,
                        logits_chunk=logits_chunk, buffers=3)
  embeds = c * b * length * d
  depth = config.num_hidden_layers
  if remat == "none":
    layers = depth * layer
  else:
    layers = c * b * depth * length * d + layer
    if remat == "minimal":  # the d->q/k/v and d->f matmul outputs stay
      q = config.num_attention_heads * config.head_dim
      kv = config.num_key_value_heads * config.head_dim
      layers += c * depth * b * length * (q + 2 * kv + 2 *
                                          config.intermediate_size + d)
  return layers + logits + embeds


def logits_bytes(config: family.Config, *, batch: int, target_len: int,
                 logits_chunk: int, buffers: int) -> int:
  """`buffers` float32 `[batch, positions, vocab]` arrays.

  positions = `logits_chunk` (at most `target_len`) when chunking is on
  (`config.logits_chunk` > 0: the losses and Q-values read one chunk of
  positions at a time, forward and backward), else `target_len`.
  """
  positions = min(logits_chunk, target_len) if logits_chunk else target_len
  return buffers * 4 * batch * positions * config.vocab_size


def activation_bytes(config: family.Config, *, batch: int, source_len: int,
                     target_len: int, remat: str = "none",
                     compute_bytes: int = 2, logits_chunk: int = 0) -> int:
  """Student forward + backward on one device's rows (see module docstring).

  Args:
    config: The student.
    batch: Rows on this device.
    source_len: Source tokens S.
    target_len: Target / rollout tokens T.
    remat: `T5Config.remat`: "none" keeps every layer's working set, "full"
      keeps each layer's input and recomputes one layer at a time, "minimal"
      keeps the weight-matmul outputs too (between the two).
    compute_bytes: 2 for bfloat16 compute.
    logits_chunk: `config.logits_chunk` (0 = whole logits).
  """
  if remat not in config_lib.REMAT_POLICIES:
    raise ValueError(f"remat must be one of {config_lib.REMAT_POLICIES}, got "
                     f"{remat!r}")
  if isinstance(config, DecoderConfig):
    return _decoder_activation_bytes(
        config, batch=batch, length=source_len + target_len,
        target_len=target_len, remat=remat, compute_bytes=compute_bytes,
        logits_chunk=logits_chunk)
  b, s, t, c = batch, source_len, target_len, compute_bytes
  d, inner = config.d_model, config.num_heads * config.d_kv
  enc, dec = _layer_working_set(config, b, s, t, c)
  # Cross-attention keys/values of every decoder layer are computed outside
  # the (rematerialised) layers and kept.
  cross_kv = config.num_decoder_layers * 2 * b * s * inner * c
  # float32 logits, softmax and their gradient.
  logits = logits_bytes(config, batch=b, target_len=t,
                        logits_chunk=logits_chunk, buffers=3)
  embeds = c * b * (s + t) * d
  if remat == "none":
    layers = config.num_layers * enc + config.num_decoder_layers * dec
  else:
    inputs = c * b * (config.num_layers * s + config.num_decoder_layers * t) * d
    one_layer = max(enc, dec)
    if remat == "minimal":  # the d->H and d->f matmul outputs stay
      f = config.d_ff * (2 if config.is_gated_act else 1)
      inputs += c * (config.num_layers * b * s * (4 * inner + f + d) +
                     config.num_decoder_layers * b * t * (8 * inner + f + d))
    layers = inputs + one_layer
  return layers + cross_kv + logits + embeds


def rollout_bytes(config: family.Config, *, batch: int, source_len: int,
                  target_len: int, compute_bytes: int = 2) -> int:
  """Sampling: self-attention caches, cross keys/values, encoder output.

  A decoder: the key / value cache of prompt + completion, every layer.
  """
  if isinstance(config, DecoderConfig):
    kv = config.num_key_value_heads * config.head_dim
    return (compute_bytes * 2 * config.num_hidden_layers * batch *
            (source_len + target_len) * kv)
  inner = config.num_heads * config.d_kv
  c = compute_bytes
  return (c * 2 * config.num_decoder_layers * batch * (target_len + source_len)
          * inner + c * batch * source_len * config.d_model)


def teacher_forward_bytes(config: family.Config, *, batch: int, source_len: int,
                          target_len: int, compute_bytes: int = 2,
                          logits_chunk: int = 0) -> int:
  """No gradient: one layer alive, cross keys/values, float32 logits x2.

  A decoder: one layer alive over prompt + completion, the logits of the
  completion positions only.
  """
  if isinstance(config, DecoderConfig):
    return (_decoder_layer_working_set(config, batch,
                                       source_len + target_len,
                                       compute_bytes) +
            logits_bytes(config, batch=batch, target_len=target_len,
                         logits_chunk=logits_chunk, buffers=2))
  enc, dec = _layer_working_set(config, batch, source_len, target_len,
                                compute_bytes)
  inner = config.num_heads * config.d_kv
  return (max(enc, dec) + 2 * config.num_decoder_layers * batch * source_len *
          inner * compute_bytes +
          logits_bytes(config, batch=batch, target_len=target_len,
                       logits_chunk=logits_chunk, buffers=2))


def rl_step_bytes(teacher: family.Config, student: family.Config, *, devices: int,
                  global_batch: int, source_len: int, target_len: int,
                  remat: str, teacher_bytes: int = 2,
                  logits_chunk: int = 0) -> dict[str, int]:
  """Per-device bytes of one RL step on a pure-FSDP mesh of `devices`."""
  if global_batch % devices:
    raise ValueError(f"global_batch={global_batch} must be a multiple of the "
                     f"device count {devices}")
  b = global_batch // devices
  t_local, t_largest = sharded_param_elements(teacher, fsdp=devices)
  s_local, s_largest = sharded_param_elements(student, fsdp=devices)
  kw = dict(batch=b, source_len=source_len, target_len=target_len)
  parts = {
      "teacher params": t_local * teacher_bytes,
      "student params+grads+adam": s_local * 16,
      "gathered weights": 2 * t_largest + 2 * s_largest,
      "activations": max(rollout_bytes(student, **kw),
                         teacher_forward_bytes(teacher, **kw,
                                               logits_chunk=logits_chunk),
                         activation_bytes(student, remat=remat, **kw,
                                          logits_chunk=logits_chunk)),
  }
  parts["total"] = sum(parts.values())
  return parts


def table(*, global_batch: int = 16, source_len: int = 512,
          target_len: int = 128, teacher_name: str = "xl",
          students: tuple[str, ...] = ("t5-base", "t5-large"),
          accelerators: tuple[Accelerator, ...] = ACCELERATORS,
          logits_chunk: int = 16) -> str:
  """The Markdown table of the README."""
  teacher = config_lib.get_config(teacher_name)
  chunk = (f"float32 logits {logits_chunk} positions at a time "
           f"(`logits_chunk={logits_chunk}`)" if logits_chunk else
           "whole float32 logits (`logits_chunk=0`)")
  lines = [
      f"Teacher FLAN-T5-XL shape (`{teacher_name}`, "
      f"{param_count(teacher) / 1e9:.2f} B parameters, bfloat16, frozen); "
      f"students float32 + AdamW; RL step with a global batch of "
      f"{global_batch} rows, source {source_len} and rollout {target_len} "
      f"tokens, {chunk}, pure FSDP over all devices. GiB per device:", "",
      f"| student | {_STEP_COLUMNS}",
      "|---|---|---:|---:|---:|---:|---:|---|"]
  kw = dict(global_batch=global_batch, source_len=source_len,
            target_len=target_len, logits_chunk=logits_chunk)
  for name in students:
    student = config_lib.get_config(name)
    for acc in accelerators:
      lines.append(_step_row(f"{name} ({param_count(student) / 1e6:.0f} M)",
                             teacher, student, acc, **kw))
  return "\n".join(lines) + "\n"


# The columns of `table` and `decoder_table` after the first.
_STEP_COLUMNS = ("accelerator | teacher params | student state | gathered | "
                 "activations (remat none / full) | total none / full | "
                 "fits (none / full) |")


def _step_row(label: str, teacher: family.Config, student: family.Config,
              acc: Accelerator, **kw: Any) -> str:
  """One row of `table` / `decoder_table`: the step with remat none and full."""
  none, full = (rl_step_bytes(teacher, student, devices=acc.devices,
                              remat=r, **kw) for r in ("none", "full"))
  g = lambda x: f"{x / GiB:.2f}"
  fits = lambda p: "yes" if p["total"] <= acc.bytes_per_device else "no"
  return (f"| {label} | {acc.name} | {g(none['teacher params'])} | "
          f"{g(none['student params+grads+adam'])} | "
          f"{g(none['gathered weights'])} | {g(none['activations'])} / "
          f"{g(full['activations'])} | {g(none['total'])} / "
          f"{g(full['total'])} | {fits(none)} / {fits(full)} |")


DECODER_PAIRS = (("qwen1.5-4b", "qwen1.5-0.5b"),
                 ("llama-3-8b", "llama-3.2-1b"))


def decoder_table(*, global_batch: int = 16, source_len: int = 512,
                  target_len: int = 128,
                  pairs: tuple[tuple[str, str], ...] = DECODER_PAIRS,
                  accelerators: tuple[Accelerator, ...] = ACCELERATORS[1:],
                  logits_chunk: int = 16) -> str:
  """The README's table for decoder-only pairs (`DECODER_SIZES` shapes)."""
  lines = [
      f"Decoder-only pairs: teacher bfloat16, frozen; student float32 + "
      f"AdamW; prompt {source_len} and completion {target_len} tokens in one "
      f"sequence, a global batch of {global_batch} rows, logits of the "
      f"completion positions {logits_chunk or 'all'} at a time, pure FSDP. "
      f"GiB per device:", "",
      f"| teacher -> student | {_STEP_COLUMNS}",
      "|---|---|---:|---:|---:|---:|---:|---|"]
  kw = dict(global_batch=global_batch, source_len=source_len,
            target_len=target_len, logits_chunk=logits_chunk)
  for teacher_name, student_name in pairs:
    teacher = get_decoder_config(teacher_name)
    student = get_decoder_config(student_name)
    label = (f"{teacher_name} ({param_count(teacher) / 1e9:.2f} B) -> "
             f"{student_name} ({param_count(student) / 1e9:.2f} B)")
    for acc in accelerators:
      lines.append(_step_row(label, teacher, student, acc, **kw))
  return "\n".join(lines) + "\n"


def lora_state_bytes(config: family.Config, *, rank: int, devices: int,
                     base_bytes: int) -> dict[str, int]:
  """Per-device bytes of a LoRA student's state (pure FSDP): the sharded
  base in `base_bytes` (4 or 2), the replicated adapters' float32 values +
  grads + AdamW (16 bytes), and the merged float32 kernels a step holds
  (`lora.LoraStudent.apply`; the whole base when it is bfloat16)."""
  targets = lora_lib.LoraConfig(rank=rank)
  base, _ = sharded_param_elements(config, fsdp=devices)
  adapters = lora_lib.adapter_count(config, targets)
  merged = (base if base_bytes != 4 else
            lora_lib.target_count(config, targets) // devices)
  parts = {"base": base * base_bytes, "adapters+grads+adam": adapters * 16,
           "merged in the step": merged * 4}
  return {**parts, "total": sum(parts.values())}


def lora_table(*, rank: int = 16, devices: int = 8, students: tuple[str, ...]
               = ("qwen1.5-0.5b", "llama-3.2-1b", "t5-large")) -> str:
  """The README's table: a full student's state against LoRA students'."""
  g = lambda x: f"{x / GiB:.2f}"
  lines = [
      f"LoRA students (`config.student.lora`, rank {rank} on every "
      f"attention and MLP kernel) against full training, per device on a "
      f"pure-FSDP mesh of {devices} devices: the full student's float32 "
      f"parameters + gradients + AdamW (16 bytes per parameter) against the "
      f"frozen base (float32 or bfloat16, sharded) + the replicated "
      f"adapters' 16 bytes per adapter number, and the merged float32 "
      f"parameters the step holds while it runs. GiB per device:", "",
      "| student | adapter numbers | AdamW moments full / LoRA | full: "
      "params+grads+adam | LoRA f32 base: base / adapters+grads+adam / "
      "merged in step / total | LoRA bf16 base: base / merged in step / "
      "total |",
      "|---|---:|---:|---:|---:|---:|"]
  for name in students:
    student = (get_decoder_config(name) if name in DECODER_SIZES else
               config_lib.get_config(name))
    local, _ = sharded_param_elements(student, fsdp=devices)
    f32, bf16 = (lora_state_bytes(student, rank=rank, devices=devices,
                                  base_bytes=b) for b in (4, 2))
    count = f32["adapters+grads+adam"] // 16
    lines.append(
        f"| {name} ({param_count(student) / 1e6:.0f} M) | "
        f"{count / 1e6:.2f} M ({100 * count / param_count(student):.1f} %) | "
        f"{g(local * 8)} / {g(count * 8)} | {g(local * 16)} | {g(f32['base'])} / "
        f"{g(f32['adapters+grads+adam'])} / {g(f32['merged in the step'])} "
        f"/ {g(f32['total'])} | {g(bf16['base'])} / "
        f"{g(bf16['merged in the step'])} / {g(bf16['total'])} |")
  return "\n".join(lines) + "\n"


def own_slice_bytes(teacher: T5Config, student: T5Config, *,
                    student_devices: int, teacher_devices: int,
                    global_batch: int, source_len: int, target_len: int,
                    remat: str, teacher_bytes: int = 2
                    ) -> dict[str, dict[str, int]]:
  """Per-device bytes with the teacher on its own devices (pure FSDP each).

  Returns:
    {"student": parts of one student device, "teacher": parts of one teacher
    device}, each with a "total".
  """
  for n in (student_devices, teacher_devices):
    if global_batch % n:
      raise ValueError(f"global_batch={global_batch} must be a multiple of "
                       f"the device count {n}")
  s_local, s_largest = sharded_param_elements(student, fsdp=student_devices)
  t_local, t_largest = sharded_param_elements(teacher, fsdp=teacher_devices)
  kw = dict(source_len=source_len, target_len=target_len)
  b_s, b_t = global_batch // student_devices, global_batch // teacher_devices
  on_student = {
      "student params+grads+adam": s_local * 16,
      "gathered weights": 2 * s_largest,
      "activations": max(rollout_bytes(student, batch=b_s, **kw),
                         activation_bytes(student, batch=b_s, remat=remat,
                                          **kw)),
  }
  on_teacher = {
      "teacher params": t_local * teacher_bytes,
      "gathered weights": 2 * t_largest,
      "activations": teacher_forward_bytes(teacher, batch=b_t, **kw),
  }
  for parts in (on_student, on_teacher):
    parts["total"] = sum(parts.values())
  return {"student": on_student, "teacher": on_teacher}


def slice_table(*, global_batch: int = 16, source_len: int = 512,
                target_len: int = 128, teacher_name: str = "xl",
                students: tuple[str, ...] = ("t5-large",),
                accelerators: tuple[Accelerator, ...] = ACCELERATORS) -> str:
  """The README's table for the teacher on half the devices."""
  teacher = config_lib.get_config(teacher_name)
  lines = [
      "The same step with the teacher on its own half of the devices "
      "(`teacher_mesh.devices` = half), pure FSDP on each half. GiB per "
      "device:", "",
      "| student | accelerator | student + teacher devices | student device "
      "(state / activations none, full / total none, full) | teacher device "
      "(params / activations / total) | shared mesh total none / full | "
      "fits (none / full) |",
      "|---|---|---|---:|---:|---:|---|"]
  g = lambda x: f"{x / GiB:.2f}"
  for name in students:
    student = config_lib.get_config(name)
    for acc in accelerators:
      half = acc.devices // 2
      kw = dict(global_batch=global_batch, source_len=source_len,
                target_len=target_len)
      none, full = (own_slice_bytes(teacher, student, student_devices=half,
                                    teacher_devices=half, remat=r, **kw)
                    for r in ("none", "full"))
      shared = [rl_step_bytes(teacher, student, devices=acc.devices,
                              remat=r, **kw)["total"]
                for r in ("none", "full")]
      fits = lambda p: "yes" if max(
          p["student"]["total"], p["teacher"]["total"]) <= (
              acc.bytes_per_device) else "no"
      st, te = none["student"], none["teacher"]
      lines.append(
          f"| {name} ({param_count(student) / 1e6:.0f} M) | {acc.name} | "
          f"{half} + {half} | {g(st['student params+grads+adam'])} / "
          f"{g(st['activations'])}, {g(full['student']['activations'])} / "
          f"{g(st['total'])}, {g(full['student']['total'])} | "
          f"{g(te['teacher params'])} / {g(te['activations'])} / "
          f"{g(te['total'])} | {g(shared[0])} / {g(shared[1])} | "
          f"{fits(none)} / {fits(full)} |")
  return "\n".join(lines) + "\n"


FLAGS = flags.FlagValues()
_BATCH = flags.DEFINE_integer("batch", 16, "global batch (rows)",
                              flag_values=FLAGS)
_SOURCE_LEN = flags.DEFINE_integer("source_len", 512, "source tokens",
                                   flag_values=FLAGS)
_TARGET_LEN = flags.DEFINE_integer("target_len", 128, "target tokens",
                                   flag_values=FLAGS)
_TEACHER = flags.DEFINE_string("teacher", "xl", "teacher model config",
                               flag_values=FLAGS)
_STUDENTS = flags.DEFINE_string("students", "t5-base,t5-large",
                                "comma-separated student model configs",
                                flag_values=FLAGS)
_LOGITS_CHUNK = flags.DEFINE_integer(
    "logits_chunk", 32, "config.logits_chunk: float32 logits this many "
    "positions at a time (0 = all)", flag_values=FLAGS)
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank", 16, "also the LoRA table (config.student.lora) at this "
    "rank; 0 = none", flag_values=FLAGS)
_OWN_SLICE = flags.DEFINE_bool(
    "own_slice", False, "also the teacher on its own half of the devices "
    "(config.teacher_mesh), for the last student", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  """The command line; `argv` without the program name (default sys.argv).

  Returns the exit status: 0, or 2 after one `error:` line.
  """
  try:
    cli.parse(FLAGS, sys.argv[1:] if argv is None else argv,
              prog="python -m ketchup_jax.memory", doc=__doc__)
    if _LORA_RANK.value < 0:
      raise ValueError(f"--lora_rank must be an int >= 0 (0 = no LoRA "
                       f"table), got {_LORA_RANK.value}")
    if _LOGITS_CHUNK.value < 0:
      raise ValueError(f"--logits_chunk must be an int >= 0 (0 = whole "
                       f"logits), got {_LOGITS_CHUNK.value}")
    students = tuple(_STUDENTS.value.split(","))
    print(table(global_batch=_BATCH.value, source_len=_SOURCE_LEN.value,
                target_len=_TARGET_LEN.value, teacher_name=_TEACHER.value,
                students=students, logits_chunk=_LOGITS_CHUNK.value), end="")
    print()
    print(decoder_table(global_batch=_BATCH.value,
                        source_len=_SOURCE_LEN.value,
                        target_len=_TARGET_LEN.value,
                        logits_chunk=_LOGITS_CHUNK.value), end="")
    if _LORA_RANK.value:
      print()
      print(lora_table(rank=_LORA_RANK.value), end="")
    if _OWN_SLICE.value:
      print()
      print(slice_table(global_batch=_BATCH.value,
                        source_len=_SOURCE_LEN.value,
                        target_len=_TARGET_LEN.value,
                        teacher_name=_TEACHER.value, students=students[-1:]),
            end="")
  except ValueError as e:
    return cli.error(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())

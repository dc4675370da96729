"""Compile-only memory of one cross-entropy step: full student vs LoRA.

    python examples/lora_step_memory.py

XLA's `memory_analysis()` of the jitted `steps.supervised_step` (compiled,
not run) on this machine's backend, for a 16.8 M-parameter decoder
(4 layers, width 512, vocabulary 8192; batch 8, prompt 64 + completion 64
tokens, float32 compute): the whole student trained, and rank-16 adapters on
every attention / MLP kernel over a float32 or a bfloat16 base, the base
passed as its own argument as `train.loop` does. Arguments are the state
(+ base) and the batch; the output aliases the donated state.
"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from ketchup_jax import models
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import state as state_lib, steps

cfg = models.get_decoder_config("qwen2-tiny", hidden_size=512, intermediate_size=1536,
                                num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=64, vocab_size=8192,
                                dtype=jnp.float32)
shapes = models.family.param_shapes(cfg)
optim = state_lib.OptimConfig(steps=10, learning_rate=1e-3)
tx = state_lib.make_optimizer(optim)
B, S, T = 8, 64, 64
batch = {"input_ids": jax.ShapeDtypeStruct((B, S), jnp.int32),
         "attention_mask": jax.ShapeDtypeStruct((B, S), jnp.int32),
         "decoder_target_ids": jax.ShapeDtypeStruct((B, T), jnp.int32),
         "decoder_attention_mask": jax.ShapeDtypeStruct((B, T), jnp.int32),
         "example_mask": jax.ShapeDtypeStruct((B,), jnp.int32)}
out = {}
def mem(compiled):
  m = compiled.memory_analysis()
  return {k: getattr(m, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")}
# full
st = jax.eval_shape(functools.partial(state_lib.init_state, tx=tx, seed=0), shapes)
mods = steps.StepModels(student=cfg)
f = jax.jit(functools.partial(steps.supervised_step, models=mods, optim=optim), donate_argnums=0)
out["full"] = mem(f.lower(st, batch).compile())
for base_dtype in ("float32", "bfloat16"):
  ls = lora_lib.LoraStudent(lora_lib.LoraConfig(rank=16), base_dtype=base_dtype)
  adapters = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, lora_lib.init_adapters(shapes, cfg, ls.lora, 0)))
  st = jax.eval_shape(functools.partial(state_lib.init_state, tx=tx, seed=0), adapters)
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(base_dtype)), shapes)
  mods = steps.StepModels(student=cfg, lora=ls)
  def step(state, frozen, batch):
    s, m = steps.supervised_step(state.replace(frozen=frozen), batch, models=mods, optim=optim)
    return s.replace(frozen=None), m
  out[f"lora r16 {base_dtype} base"] = mem(jax.jit(step, donate_argnums=0).lower(st, base, batch).compile())
n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
print(json.dumps({"params": n, "adapters": lora_lib.adapter_count(cfg, lora_lib.LoraConfig(rank=16)),
                  "targeted": lora_lib.target_count(cfg, lora_lib.LoraConfig(rank=16)), **out}, indent=1))

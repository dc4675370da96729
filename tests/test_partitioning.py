"""Mesh, logical-axis rules, sharded T5 equal to unsharded on 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ketchup_jax import models
from ketchup_jax import partitioning


def test_make_mesh_shapes_and_errors():
  assert len(jax.devices()) == 8
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(partitioning.make_mesh(tensor=4).shape)["data"] == 2
  with pytest.raises(ValueError, match=r"\(data=3, fsdp=2, tensor=2\) must"
                     " multiply to the device count 8"):
    partitioning.make_mesh(data=3, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match="fsdp \\* tensor = 3 must divide"):
    partitioning.make_mesh(fsdp=3)
  # Any one axis may take the devices left over.
  assert dict(partitioning.make_mesh(data=2, fsdp=-1).shape) == {
      "data": 2, "fsdp": 4, "tensor": 1}
  assert dict(partitioning.make_mesh(data=1, fsdp=-1).shape) == {
      "data": 1, "fsdp": 8, "tensor": 1}
  assert dict(partitioning.make_mesh(data=1, fsdp=2, tensor=-1).shape) == {
      "data": 1, "fsdp": 2, "tensor": 4}
  with pytest.raises(ValueError, match=r"at most one .* got \['data', 'fsdp'\]"):
    partitioning.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="mesh.tensor must be an int >= 1 or -1"):
    partitioning.make_mesh(tensor=0)


def test_logical_to_spec_rules_duplicates_and_divisibility():
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  spec = partitioning.logical_to_spec
  assert spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert spec(("embed", "heads", "kv")) == P("fsdp", "tensor", None)
  assert spec(("activation_batch", "activation_length", "activation_embed")
             ) == P(("data", "fsdp"), None, None)
  assert spec(("unknown_name", None)) == P(None, None)
  # A mesh axis is used at most once per spec.
  assert spec(("mlp", "heads")) == P("tensor", None)
  # Odd sizes fall back to replication on that dimension only.
  assert spec(("vocab", "embed"), shape=(131, 32), mesh=mesh) == P(None, "fsdp")
  assert spec(("batch", "length"), shape=(3, 8), mesh=mesh) == P(None, None)
  with pytest.raises(ValueError, match=r"do not match shape \(3,\)"):
    spec(("batch", "length"), shape=(3,))


@pytest.mark.parametrize("vocab", [130, 131])
def test_sharded_logits_and_generate_equal_unsharded(tmp_path, vocab):
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  single = models.init("tiny", jax.random.key(0), dtype=jnp.float32,
                       vocab_size=vocab)
  single.save_pretrained(str(tmp_path))
  sharded = models.load(str(tmp_path), dtype=jnp.float32, mesh=mesh)
  assert sharded.config == single.config
  emb = sharded.params["shared"]["embedding"]
  assert emb.sharding.spec == (P("tensor", "fsdp") if vocab % 2 == 0 else
                               P(None, "fsdp"))
  q = sharded.params["encoder"]["layers_0"]["self_attention"]["q"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)

  rng = np.random.default_rng(0)
  ids = rng.integers(2, vocab, (4, 10))
  mask = np.ones_like(ids)
  mask[2, 6:] = 0
  dec = rng.integers(2, vocab, (4, 7))
  dec[:, 0] = 0
  want = np.asarray(single.logits(ids, mask, dec))
  got = sharded.logits(ids, mask, dec)
  assert len(got.sharding.device_set) == 8
  # Equal up to float32 reduction order across shards.
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=0)
  if vocab % 2 == 0:
    np.testing.assert_array_equal(
        np.asarray(sharded.generate(ids, mask, max_new_tokens=6)),
        np.asarray(single.generate(ids, mask, max_new_tokens=6)))

"""Device mesh and logical-axis sharding rules.

Every model parameter and the main activations carry *logical* axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `relpos_buckets`, `activation_batch`,
...). One rules table maps each logical name to a mesh axis (`data`, `fsdp`,
`tensor`) or to `None` (replicated). Changing the parallelism layout means
changing the mesh shape or this table, never the model code.

Parameters use `embed -> fsdp` (ZeRO-3 style weight sharding) and the
`tensor` axis for the Megatron-style split of heads / mlp / vocab. Activations
have their own names (`activation_*`) so that the batch can be sharded over
`fsdp` while the parameters' `embed` dimension is sharded over the same mesh
axis, without one `PartitionSpec` naming a mesh axis twice.

A dimension whose size is not divisible by the product of the mesh axes it maps
to is replicated instead (odd vocabulary sizes, one-row batches); see
`logical_to_spec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # GQA key / value heads (decoder-only models)
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),
    # Inputs and activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
)


def make_mesh(
    *,
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a `(data, fsdp, tensor)` mesh with `AxisType.Auto` axes.

  `data`, `fsdp` and `tensor` are the sizes within one granule (a TPU slice,
  or one process/host elsewhere: the fast ICI/NVLink links); `dcn_*` are the
  sizes across granules (the slower data-centre network). Each mesh axis is
  `ici * dcn` long. With every `dcn_*` = 1 (the default) the mesh is laid over
  all devices by `jax.make_mesh` (which keeps each process's devices
  together); otherwise by `mesh_utils.create_hybrid_device_mesh`, so that the
  `dcn_*` part of an axis only ever crosses granules.

  Args:
    data: Data-parallel size within a granule. Any one of `data`, `fsdp` and
      `tensor` may be -1: it takes the devices left over.
    fsdp: Fully-sharded-data-parallel size within a granule.
    tensor: Tensor-parallel size within a granule.
    dcn_data: Data-parallel size across granules.
    dcn_fsdp: FSDP size across granules.
    dcn_tensor: Tensor-parallel size across granules (rarely wise).
    devices: Devices to use; all of `jax.devices()` by default.

  Returns:
    A `jax.sharding.Mesh` with axis names `("data", "fsdp", "tensor")`.

  Raises:
    ValueError: if the axis sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("dcn_data", dcn_data), ("dcn_fsdp", dcn_fsdp),
                     ("dcn_tensor", dcn_tensor)):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"mesh.{name} must be an int >= 1, got {size!r}")
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (
        size < 1 and size != -1):
      raise ValueError(f"mesh.{name} must be an int >= 1 or -1 (the devices "
                       f"left over), got {size!r}")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one of mesh.data, mesh.fsdp, mesh.tensor may "
                     f"be -1, got {free}")
  granules = dcn_data * dcn_fsdp * dcn_tensor
  if len(devices) % granules:
    raise ValueError(
        f"mesh dcn_data * dcn_fsdp * dcn_tensor = {granules} must divide the "
        f"device count {len(devices)}")
  n = len(devices) // granules  # devices per granule
  if free:
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if n % fixed:
      others = " * ".join(name for name in sizes if name != free[0])
      raise ValueError(
          f"{others} = {fixed} must divide the device count {n}"
          + (" of one granule" if granules > 1 else ""))
    sizes[free[0]] = n // fixed
  data, fsdp, tensor = sizes["data"], sizes["fsdp"], sizes["tensor"]
  if data * fsdp * tensor != n:
    raise ValueError(
        f"mesh shape (data={data}, fsdp={fsdp}, tensor={tensor}) must multiply"
        f" to the device count {n}" + (
            f" of one granule ({len(devices)} devices / {granules} dcn)"
            if granules > 1 else ""))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if granules == 1:
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES,
                         axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_slice = None not in slices and len(slices) > 1
  owners = len(slices) if by_slice else len({d.process_index for d in devices})
  if owners != granules:
    raise ValueError(
        f"mesh dcn_data * dcn_fsdp * dcn_tensor = {granules} must equal the "
        f"number of {'slices' if by_slice else 'processes'} ({owners})")
  grid = mesh_utils.create_hybrid_device_mesh(
      (data, fsdp, tensor), (dcn_data, dcn_fsdp, dcn_tensor), devices,
      process_is_granule=not by_slice)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    *,
    rules: LogicalRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` through `rules`.

  Args:
    logical_axes: One logical name (or None) per array dimension.
    rules: `(logical_name, mesh_axes)` pairs; a name missing from the table is
      replicated.
    shape: The array shape. With `mesh`, a dimension not divisible by its mesh
      axes' size is replicated instead of sharded.
    mesh: The mesh, needed only for the divisibility fallback.

  Returns:
    The `PartitionSpec`. A mesh axis already used by an earlier dimension is
    not used again (that dimension is replicated).

  Raises:
    ValueError: if `shape` is given and its length differs from the axes'.
  """
  table = dict(rules)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(
        f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
      if used.intersection(axes_tuple):
        axes = None
      elif (shape is not None and mesh is not None and
            shape[i] % _axis_size(mesh, axes)):
        axes = None
      else:
        used.update(axes_tuple)
    spec.append(axes)
  return PartitionSpec(*spec)


def logical_to_sharding(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
  """`logical_to_spec` wrapped in a `NamedSharding` on `mesh`."""
  return NamedSharding(
      mesh, logical_to_spec(logical_axes, rules=rules, shape=shape, mesh=mesh))


def tree_shardings(
    logical_tree: Any,
    shapes_tree: Any,
    mesh: Mesh,
    *,
    rules: LogicalRules = DEFAULT_RULES,
) -> Any:
  """Shardings for a pytree, from a matching tree of logical-axis tuples.

  Args:
    logical_tree: Pytree whose leaves are tuples of logical names (as returned
      by `ketchup_jax.models.logical_axes`).
    shapes_tree: Pytree of arrays or `jax.ShapeDtypeStruct` with the same
      structure.
    mesh: The device mesh.
    rules: The logical rules table.

  Returns:
    A pytree of `NamedSharding` with the structure of `shapes_tree`.
  """
  is_axes = lambda x: isinstance(x, tuple) and all(
      a is None or isinstance(a, str) for a in x)
  return jax.tree.map(
      lambda axes, x: logical_to_sharding(
          axes, mesh, rules=rules, shape=x.shape),
      logical_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The rows of an input batch over the data-parallel axes (`data`, `fsdp`).

  Every array of a batch has the rows first, whatever its rank.
  """
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def with_logical_constraint(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    *,
    mesh: Mesh | None,
    rules: LogicalRules = DEFAULT_RULES,
) -> jax.Array:
  """Constrains an activation's sharding by logical names; no-op without mesh.

  Args:
    x: The array, inside `jax.jit`.
    logical_axes: One logical name per dimension of `x`.
    mesh: The mesh; None (single device, tests) leaves `x` unconstrained.
    rules: The logical rules table.

  Returns:
    `x`, with a sharding constraint when `mesh` is given.
  """
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_sharding(logical_axes, mesh, rules=rules, shape=x.shape))


def rules_dict(rules: LogicalRules = DEFAULT_RULES) -> Mapping[str, Any]:
  """The rules table as a dict (for logging / configs)."""
  return dict(rules)

"""Sharding declared once, as data: logical axis names -> mesh axes.

Parameters carry `logical_axes` metadata (see layers.param); activations are constrained with
`constrain(x, names)`. `LOGICAL_RULES` is the only place that decides what is split where.

Mesh axes: 'data' (pure data parallel: params replicated), 'fsdp' (data parallel with params
and optimizer state sharded, ZeRO-3 style), 'tensor' (heads / MLP hidden / vocab split).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mta_jax import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # --- parameters ---------------------------------------------------------------------
    ("vocab", "tensor"),          # embedding rows (tied output projection)
    ("embed", "fsdp"),            # model width: the FSDP-sharded dimension of every matrix
    ("heads", "tensor"),          # q/k/v/o heads and the per-head MTA conv kernels
    ("head_groups", "tensor"),    # head-mixing groups: a group never straddles two shards
    ("head_dim", None),
    ("mlp", "tensor"),            # SwiGLU hidden
    ("norm", None),               # RMSNorm / group-norm scales, gate weights
    ("kernel", None),             # conv taps and in-group mixing matrices
    # --- activations --------------------------------------------------------------------
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (filled with the remaining devices).

  Axis types are Auto: partitioning is pjit-style (jit in/out shardings + constraints).
  """
  devices = jax.devices() if devices is None else devices
  shape = config_lib.resolve_mesh_shape(config_lib.MeshConfig(data, fsdp, tensor), len(devices))
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: tuple, shape: tuple[int, ...] | None = None,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical `names`. With `shape` and `mesh`, a dimension that the mesh axes
  do not divide evenly is replicated instead (e.g. a 29-letter toy vocabulary on tensor=2)."""
  spec = []
  used: set[str] = set()
  for i, name in enumerate(names):
    if name is not None and name not in _RULES:
      raise ValueError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES; add one.")
    axes = _RULES.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis shards one dim only
    if mesh is not None:
      axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes_t):
        axes_t = ()
    used.update(axes_t)
    spec.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*spec)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """with_sharding_constraint by logical names, when a mesh is set (a no-op otherwise)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _variable_spec(var, mesh: Mesh | None) -> P:
  names = var.get_metadata().get("logical_axes")
  shape = var.get_value().shape
  if names is None:
    return P(*([None] * len(shape)))
  return logical_to_spec(names, shape, mesh)


def state_specs(state: nnx.State, mesh: Mesh | None = None) -> nnx.State:
  """PartitionSpecs for every variable of an (abstract) nnx.State, from its logical axes.

  Optimizer moments are nnx Variables that copy their parameter's metadata, so the same
  function shards the optimizer state like its parameters.
  """
  return jax.tree.map(lambda v: _variable_spec(v, mesh), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

"""Pytrees as path-keyed dicts, and plain Orbax PyTree files (no manager, no optimizer).

A tree is stored as a nested dict keyed by its pytree path, with nnx Variables unwrapped, so the
on-disk layout does not depend on how the state is spelled in Python. `flatten` / `nest` convert
between a tree and {("blocks", "0", "attn", "wq"): leaf}; `fill` puts flat values back into a
tree of the original structure. Used by checkpoint.py (train states), export.py and retrofit.py.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mta_jax import paths

Path = tuple[str, ...]


def _is_leaf(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _unwrap(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def flatten(tree) -> dict[Path, Any]:
  """{path tuple of str: leaf} with nnx Variables unwrapped."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return {tuple(_key_str(k) for k in path): _unwrap(v) for path, v in flat}


def nest(flat: Mapping[Path, Any]) -> dict:
  """{path: leaf} -> nested dict (the on-disk layout)."""
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def to_storable(tree) -> dict:
  """Any pytree -> nested dict of arrays keyed by its path (the on-disk layout)."""
  return nest(flatten(tree))


def fill(abstract, flat: Mapping[Path, Any]):
  """`abstract` (any pytree, nnx Variables allowed) with its leaves replaced from `flat`."""
  def one(path, leaf):
    value = flat[tuple(_key_str(k) for k in path)]
    return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value
  return jax.tree_util.tree_map_with_path(one, abstract, is_leaf=_is_leaf)


def path_str(path: Path) -> str:
  return ".".join(path)


def abstract_leaf(x, sharding=None) -> jax.ShapeDtypeStruct:
  """ShapeDtypeStruct of `x` with `sharding` (default: x's own, else the first device)."""
  if sharding is None:
    sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def abstract_flat(abstract_tree, shardings=None) -> dict[Path, jax.ShapeDtypeStruct]:
  """{path: ShapeDtypeStruct} carrying the CURRENT mesh's shardings (a restore target)."""
  flat_sh = {}
  if shardings is not None:
    flat_sh = flatten(jax.tree.map(lambda s: s, shardings, is_leaf=lambda s: isinstance(
        s, (jax.sharding.Sharding, nnx.Variable))))
  return {p: abstract_leaf(v, flat_sh.get(p)) for p, v in flatten(abstract_tree).items()}


def abstract_storable(abstract_tree, shardings=None) -> dict:
  """Restore target: nested dict of ShapeDtypeStruct carrying the CURRENT mesh's shardings."""
  return nest(abstract_flat(abstract_tree, shardings))


def tree_shape_diff(stored: Mapping[Path, Any], target: Mapping[Path, Any],
                    item: str) -> list[str]:
  """Missing / unexpected / reshaped leaves between two flat {path: array-like} maps."""
  diffs = []
  for p in sorted(set(target) - set(stored)):
    diffs.append(f"{item}.{path_str(p)}: missing in checkpoint (current shape "
                 f"{tuple(target[p].shape)})")
  for p in sorted(set(stored) - set(target)):
    diffs.append(f"{item}.{path_str(p)}: in checkpoint (shape {tuple(stored[p].shape)}) but "
                 "not in the current model")
  for p in sorted(set(stored) & set(target)):
    if tuple(stored[p].shape) != tuple(target[p].shape):
      diffs.append(f"{item}.{path_str(p)}: checkpoint shape {tuple(stored[p].shape)}, current "
                   f"{tuple(target[p].shape)}")
  return diffs


def metadata_tree(md) -> dict[Path, Any]:
  """Flat {path: metadata with .shape/.dtype} from an Orbax metadata object."""
  md = getattr(md, "item_metadata", md)
  return flatten(md.tree if hasattr(md, "tree") else md)


def save_tree(path, tree) -> None:
  """Synchronously write one PyTree (nested dict of arrays) as an Orbax checkpoint at `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(epath.Path(paths.resolve(path)), tree)
    ckptr.wait_until_finished()


def tree_metadata(path) -> dict[Path, Any]:
  """Flat {path: metadata with .shape/.dtype} of an Orbax PyTree checkpoint directory."""
  with ocp.StandardCheckpointer() as ckptr:
    return metadata_tree(ckptr.metadata(epath.Path(paths.resolve(path))))


def restore_tree(path, target) -> dict:
  """Restore a PyTree checkpoint into `target` (nested dict of ShapeDtypeStruct w/ shardings)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(epath.Path(paths.resolve(path)), target)

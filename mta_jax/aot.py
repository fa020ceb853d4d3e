"""--mode=compile: the real train and eval steps compiled ahead of time, for a TPU slice or here.

    python train.py --config=configs/paper_880m_mta.py --mode=compile \
        --config.compile.topology=v5e:16x16 --config.model.scan_layers=true

With `compile.topology` set, the devices are the compile-only devices of that TPU topology (from
libtpu, which `jax[tpu]` installs; no TPU needed); multislice copies it `compile.num_slices` times
over DCN. Otherwise they are this host's devices. The state and the batch are abstract
(ShapeDtypeStructs with their shardings): nothing is allocated, so a pod-sized model compiles on a
laptop-sized host. Concrete arrays (the PRNG key the step closes over) are built outside the mesh:
a jit on compile-only devices cannot run anything.

The report: compile time, per-chip memory (arguments, outputs, temporaries, aliased, total) next
to the chip's HBM, whether it fits, and XLA's FLOP count next to `flops.py`'s. A step that does
not fit raises `DoesNotFitError` (a ConfigError: exit status 2 with the message).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mta_jax import config as config_lib
from mta_jax import flops as flops_lib
from mta_jax import sharding
from mta_jax import train_lib
from mta_jax.config import TrainConfig
from mta_jax.data.rows import ROW_KEYS

GIB = 2**30

# Per-chip HBM (GiB) and the chip configuration MaxText's train_compile uses, by topology prefix.
CHIPS = {
    "v4": (32.0, "megacore"),
    "v5e": (16.0, "default"),
    "v5p": (95.0, "megacore"),
    "v6e": (32.0, "default"),
}


class DoesNotFitError(config_lib.ConfigError):
  """The compiled step needs more memory per chip than the chip has."""


@dataclasses.dataclass
class CompileReport:
  """One compiled step: seconds, bytes per chip, FLOPs per step."""
  name: str
  seconds: float                   # wall clock
  cpu_seconds: float               # this process's CPU time (all threads): steadier on a busy host
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int
  xla_flops_per_chip: float | None
  xla_bytes_per_chip: float | None
  host_peak_bytes: int = 0         # this process's peak resident memory after the compile

  @property
  def total(self) -> int:
    """Peak per-chip bytes: live arguments + outputs + temporaries, minus what is aliased."""
    return self.arguments + self.outputs + self.temporaries - self.aliased


def _chip(topology: str) -> tuple[float, str]:
  prefix = topology.split(":", 1)[0].lower()
  if prefix not in CHIPS:
    raise config_lib.ConfigError(
        f"compile.topology={topology!r}: unknown chip {prefix!r}; use one of "
        f"{sorted(CHIPS)} as '<chip>:<shape>', e.g. 'v5e:16x16' or 'v5p:4x4x4'.")
  return CHIPS[prefix]


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` copies of a TPU topology such as 'v5e:2x2'."""
  _, chip_config = _chip(topology)
  # Compile-only devices open no TPU, so several compiles may share a host: skip libtpu's
  # one-process-per-host lockfile (an explicit setting in the environment wins).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=chip_config, **kwargs)
  except Exception as e:  # libtpu missing or the shape unknown to it
    raise config_lib.ConfigError(
        f"compile.topology={topology!r} could not be built ({type(e).__name__}: {e}); it needs "
        "libtpu (pip install 'jax[tpu]') and a shape the chip has, e.g. v5e:2x2, v5e:16x16, "
        "v5p:2x2x1, v4:2x2x1.") from e
  return list(desc.devices)


def compile_mesh(cfg: TrainConfig, devices: list, num_slices: int = 1) -> Mesh:
  """The config's ('data', 'fsdp', 'tensor') mesh over `devices`; with several slices the
  slices split the first of data / fsdp that they divide (that axis crosses DCN)."""
  shape = config_lib.resolve_mesh_shape(cfg.mesh, len(devices))
  if num_slices == 1:
    return sharding.make_mesh(*shape, devices=devices)
  from jax.experimental import mesh_utils
  axis = next((i for i in (0, 1) if shape[i] % num_slices == 0), None)
  if axis is None:
    raise config_lib.ConfigError(
        f"compile.num_slices={num_slices} must divide mesh.data or mesh.fsdp (resolved "
        f"data={shape[0]}, fsdp={shape[1]}): only data parallelism crosses slices.")
  dcn = [1, 1, 1]
  dcn[axis] = num_slices
  ici = list(shape)
  ici[axis] //= num_slices
  arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  return Mesh(arr, sharding.MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def _abstract_batch(cfg: TrainConfig, mesh: Mesh, accum: bool) -> dict:
  rows = cfg.data.batch_size if accum else (cfg.data.eval_batch_size or cfg.data.batch_size)
  shape = ((cfg.optim.grad_accum,) if accum else ()) + (rows, cfg.data.seq_len)
  sh = train_lib.batch_shardings(mesh, accum=accum)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                  sharding=sh) for k in ROW_KEYS}


def _cost(compiled) -> tuple[float | None, float | None]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None, None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None, None
  return cost.get("flops"), cost.get("bytes accessed")


def host_peak_bytes() -> int:
  """This process's peak resident memory (Linux VmHWM; elsewhere getrusage's ru_maxrss)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource
  import sys
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def _report(name: str, seconds: float, cpu_seconds: float, compiled) -> CompileReport:
  m = compiled.memory_analysis()
  get = lambda attr: int(getattr(m, attr, 0) or 0) if m is not None else 0
  flops, bytes_ = _cost(compiled)
  return CompileReport(name, seconds, cpu_seconds, get("argument_size_in_bytes"),
                       get("output_size_in_bytes"), get("temp_size_in_bytes"),
                       get("alias_size_in_bytes"), get("generated_code_size_in_bytes"), flops,
                       bytes_, host_peak_bytes())


def _save(compiled, save_dir: str, name: str) -> list[str]:
  """The optimized HLO (text) and the serialized executable (pickle of jax's payload)."""
  from jax.experimental import serialize_executable
  os.makedirs(save_dir, exist_ok=True)
  hlo = os.path.join(save_dir, f"{name}.hlo.txt")
  with open(hlo, "w") as f:
    f.write(compiled.as_text())
  exe = os.path.join(save_dir, f"{name}.executable.pkl")
  with open(exe, "wb") as f:
    pickle.dump(serialize_executable.serialize(compiled), f)
  return [hlo, exe]


def compile_steps(cfg: TrainConfig, devices: list | None = None,
                  save_dir: str = "") -> tuple[Mesh, list[CompileReport]]:
  """Compiles the train step (and the eval step when cfg.compile.eval_step) for `devices`
  (default: this host's) with abstract state and batch; returns the mesh and one report each."""
  devices = list(jax.devices()) if devices is None else devices
  checked = copy.deepcopy(cfg)  # no data is read: only the batch's shape matters here
  checked.data.source = "synthetic"
  config_lib.validate(checked, len(devices), 1)
  mesh = compile_mesh(cfg, devices, cfg.compile.num_slices)
  defs, abstract = train_lib.abstract_defs_and_state(cfg)
  shardings = train_lib.train_state_shardings(abstract, mesh)
  state = train_lib.with_shardings(abstract, shardings)
  # Built here, outside the mesh: the train step closes over a concrete PRNG key.
  train_step = train_lib.jit_train_step(cfg, defs, shardings, mesh)
  eval_step = train_lib.jit_eval_step(cfg, defs, shardings, mesh) if cfg.compile.eval_step else None
  reports = []
  with jax.set_mesh(mesh):
    jobs = [("train_step", train_step, (state, _abstract_batch(cfg, mesh, accum=True)))]
    if eval_step is not None:
      jobs.append(("eval_step", eval_step, (state.params, _abstract_batch(cfg, mesh, False))))
    for name, fn, args in jobs:
      t0, c0 = time.time(), time.process_time()
      compiled = fn.lower(*args).compile()
      reports.append(_report(name, time.time() - t0, time.process_time() - c0, compiled))
      if save_dir:
        _save(compiled, save_dir, name)
  return mesh, reports


def counted_flops_as_xla_counts(cfg: TrainConfig) -> float:
  """flops.py's count of what XLA's cost analysis sees: it counts a loop body once, so with
  scanned layers only one period of the scanned run (plus the unrolled layers) is counted."""
  from mta_jax import model as model_lib  # local: model pulls in flax
  if not cfg.model.scan_layers:
    return flops_lib.train_flops_per_step(cfg)
  plan = model_lib.scan_plan(cfg.model)
  once = copy.deepcopy(cfg)
  once.model.n_layers -= max(plan.repeats - 1, 0) * plan.period
  return flops_lib.train_flops_per_step(once)


def _gib(b: float) -> str:
  return f"{b / GIB:.2f} GiB"


def format_report(cfg: TrainConfig, mesh: Mesh, reports: list[CompileReport], hbm: float | None,
                  where: str) -> str:
  n_chips = mesh.devices.size
  counted = flops_lib.train_flops_per_step(cfg)
  lines = [f"compiled for {where}: {n_chips} devices ({mesh.devices.flat[0].device_kind}), "
           f"mesh {dict(mesh.shape)}, batch {cfg.data.batch_size} x {cfg.data.seq_len}"
           f"{f' x {cfg.optim.grad_accum} micro-batches' if cfg.optim.grad_accum > 1 else ''}, "
           f"scan_layers={cfg.model.scan_layers}, remat={cfg.model.remat}"]
  for r in reports:
    hbm_txt = f" of {_gib(hbm)} HBM ({100 * r.total / hbm:.0f}%)" if hbm else ""
    lines.append(f"{r.name}: compiled in {r.seconds:.1f} s ({r.cpu_seconds:.1f} s CPU, host peak "
                 f"memory {_gib(r.host_peak_bytes)}); per chip: arguments "
                 f"{_gib(r.arguments)}, outputs {_gib(r.outputs)}, temporaries "
                 f"{_gib(r.temporaries)}, aliased {_gib(r.aliased)}, total {_gib(r.total)}"
                 f"{hbm_txt}")
    if r.name == "train_step":
      if r.xla_flops_per_chip:
        xla = r.xla_flops_per_chip * n_chips
        lines.append(f"  FLOPs per step: XLA {xla:.3e} ({r.xla_flops_per_chip:.3e} per chip), "
                     f"flops.py {counted:.3e} (XLA / counted = {xla / counted:.2f})")
        if cfg.model.scan_layers:
          once = counted_flops_as_xla_counts(cfg)
          lines.append(f"  XLA counts the scanned period once: flops.py for the layers it counts "
                       f"{once:.3e} (XLA / that = {xla / once:.2f})")
      if r.xla_bytes_per_chip:
        lines.append(f"  XLA bytes accessed per chip per step: {r.xla_bytes_per_chip:.3e}")
  return "\n".join(lines)


def check_fits(reports: list[CompileReport], hbm: float | None, cfg: TrainConfig) -> None:
  if not hbm:
    return
  for r in reports:
    if r.total > hbm:
      raise DoesNotFitError(
          f"{r.name} needs {_gib(r.total)} per chip (arguments {_gib(r.arguments)}, "
          f"temporaries {_gib(r.temporaries)}, outputs {_gib(r.outputs)}) but the chip has "
          f"{_gib(hbm)}; lower data.batch_size (now {cfg.data.batch_size}) or raise "
          f"optim.grad_accum, use model.remat='full' (now {cfg.model.remat!r}), shard more "
          "(mesh.fsdp), or compile for a larger topology.")


def compile_main(cfg: TrainConfig, workdir: str) -> list[CompileReport]:
  """--mode=compile: compiles, prints the report, writes it to <workdir>/compile.json."""
  c = cfg.compile
  if c.topology:
    devices = topology_devices(c.topology, c.num_slices)
    hbm = (c.hbm_gib or _chip(c.topology)[0]) * GIB
    where = c.topology + (f" x {c.num_slices} slices" if c.num_slices > 1 else "")
  else:
    devices, hbm = list(jax.devices()), (c.hbm_gib * GIB or None)
    where = f"this host ({jax.devices()[0].platform})"
    if c.num_slices > 1:
      raise config_lib.ConfigError("compile.num_slices > 1 needs compile.topology (a TPU slice).")
  save_dir = c.save_dir and os.path.abspath(c.save_dir)
  mesh, reports = compile_steps(cfg, devices, save_dir)
  print(format_report(cfg, mesh, reports, hbm, where), flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compile.json"), "w") as f:
      json.dump({"topology": c.topology, "num_slices": c.num_slices, "hbm_bytes": hbm,
                 "counted_flops_per_step": flops_lib.train_flops_per_step(cfg),
                 "counted_flops_as_xla_counts": counted_flops_as_xla_counts(cfg),
                 "reports": [dict(dataclasses.asdict(r), total=r.total) for r in reports],
                 "config": config_lib.to_dict(cfg)}, f, indent=2, default=str)
  if save_dir:
    print(f"saved the optimized HLO and the serialized executables under {save_dir}")
  check_fits(reports, hbm, cfg)
  return reports


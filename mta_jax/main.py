"""The training command: train / eval / count_params / export / compile one configuration.

Run as `python train.py ...` in a checkout or `mta-train ...` once installed (`pip install .`);
both are this module's `run()`. See train.py for examples.

`--config=configs/<file>.py[:variant]` names an experiment file. A path that does not exist as
given is looked up in the configs shipped with mta_jax (the checkout's `configs/`, or the
installed package's copy), so `mta-train --config=configs/toy.py:baseline` works from any
directory. Experiment files import each other as `configs.<name>`.
`--config.<field>=<value>` overrides any field of the TrainConfig (see mta_jax/config.py).
Only warnings and errors are logged unless asked: `--verbosity=0` (or `-v 0`) adds INFO logs
(JAX backend discovery, Orbax saves), `-v 1` debug logs.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mta_jax import paths

# Module level, as absl flags are: importing this module defines the command's flags.
_CONFIGS = paths.configs_dir()
paths.make_configs_importable(_CONFIGS)
sys.argv = paths.resolve_config_arg(sys.argv, _CONFIGS)


def _bad_override(e: Exception):
  print(f"config error: bad --config override: {e}. Fields are those of "
        "mta_jax.config.TrainConfig (e.g. --config.model.n_layers=4).", file=sys.stderr)
  sys.exit(2)


try:  # config_flags resolves the --config.<field> overrides in sys.argv right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_CONFIGS, "toy.py"),
      "Experiment file (configs/<name>.py[:variant]); override fields with "
      "--config.<field>=...", lock_config=False)
except (KeyError, AttributeError, TypeError) as e:
  _bad_override(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the resolved config "
    "(default: runs/<config name>).")
_MODE = flags.DEFINE_string("mode", "train", "train | eval | count_params | export | compile")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto = when the environment shows a multi-process "
    "launch (TPU pod slice, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS set).")


def _multi_process_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def _maybe_initialize_distributed() -> None:
  mode = _DISTRIBUTED.value
  if mode == "true" or (mode == "auto" and _multi_process_env()):
    import jax
    # TPU slices, SLURM and Open MPI are detected by JAX itself; a hand launch passes
    # JAX_COORDINATOR_ADDRESS (read by JAX) plus JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _workdir(cfg) -> str:
  """The run's directory, absolute (or a URI): relative paths are relative to the directory
  train.py is started from, and nothing later depends on it."""
  return paths.resolve(_WORKDIR.value or os.path.join("runs", cfg.name or "default"))


def run_train(cfg, workdir):
  from mta_jax import train_lib
  train_lib.train_and_evaluate(cfg, workdir)


def run_eval(cfg, workdir):
  from mta_jax import train_lib
  train_lib.evaluate_main(cfg, workdir)


def run_count_params(cfg, workdir):
  """Exact parameter count from abstract shapes (nothing is allocated)."""
  del workdir
  from mta_jax import config as config_lib
  from mta_jax.model import abstract_model, count_params
  import jax
  from flax import nnx
  config_lib.check_types(cfg)
  config_lib.validate_model(cfg.model)  # the data need not exist to count parameters
  m = cfg.model
  state = nnx.state(abstract_model(m), nnx.Param)
  groups: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = [str(k) for k in (getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
                             for p in path) if k is not None and k != "value"]
    if keys[0] == "blocks":  # one line per parameter kind, summed over layers
      keys = ["blocks", "*"] + keys[2:]
    name = ".".join(keys)
    groups[name] = groups.get(name, 0) + int(leaf.size)
  print(f"model: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
        f"head_dim={m.resolved_head_dim} ffn={m.resolved_ffn_hidden} vocab={m.vocab_size} "
        f"kq_layers={list(m.kq_layer_indices())}")
  for name, n in sorted(groups.items()):
    print(f"  {name:36s} {n:>14,}")
  print(f"params: {count_params(m)}")


def run_compile(cfg, workdir):
  """Ahead-of-time compile of the train / eval steps for compile.topology (or this host)."""
  from mta_jax import aot
  aot.compile_main(cfg, workdir)


def run_export(cfg, workdir):
  from mta_jax import export
  export.export_main(cfg, workdir)


# --mode -> function(cfg, workdir). Add a mode by adding an entry.
MODES = {
    "train": run_train,
    "eval": run_eval,
    "count_params": run_count_params,
    "export": run_export,
    "compile": run_compile,
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value not in MODES:
    raise app.UsageError(f"--mode={_MODE.value!r}; choose one of {sorted(MODES)}.")
  cfg = _CONFIG.value
  try:
    paths.resolve_config_paths(cfg)
  except OSError as e:  # config_flags defers a missing file's error to the first field read
    _bad_config_file(e)
  if _MODE.value not in ("count_params", "compile"):
    _maybe_initialize_distributed()
  from mta_jax import checkpoint, export, faults, lease
  from mta_jax.config import ConfigError
  faults.install_thread_hook()
  workdir = None
  try:
    workdir = _workdir(cfg)
    if _MODE.value != "count_params":
      from mta_jax import storage
      storage.check_dir(workdir, "--workdir")  # a file, or a bucket out of reach: say so now
    MODES[_MODE.value](cfg, workdir)
  except ConfigError as e:
    _exit(f"config error: {e}", 2)
  except lease.WorkdirBusyError as e:  # another run holds the workdir
    _exit(f"error: {e}", 2)
  except export.ExportError as e:  # a missing / incomplete / corrupt export, a bad export dir
    _exit(f"error: {e}", 2)
  except FloatingPointError as e:  # train_lib.NonFiniteLossError: NaN / inf loss or params
    _exit(f"error: {e}", 3)
  except lease.LeaseLostError as e:
    _exit(f"error: {e}", 1)
  except checkpoint.CheckpointError as e:  # unreadable / corrupt checkpoint files
    _exit(f"error: {e}", 1)
  except KeyboardInterrupt:
    _exit("error: interrupted (Ctrl-C) without saving the current step; the latest complete "
          f"checkpoint is step {faults.latest_checkpoint_step(workdir)}.", 130)
  except Exception as e:  # noqa: BLE001 - storage faults become one line, the rest re-raise
    line = faults.describe(e, workdir or "")
    if line is None:
      raise
    _exit(f"error: {line}", 1)


def _exit(message: str, status: int):
  """Print the one-line error and leave without running atexit hooks of libraries that would
  retry the failed writes (each with its own traceback); our files are closed already."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def _parse_flags(argv):
  """absl parsing, with bad --config.<field> overrides reported as one clear line."""
  try:
    rest = flags.FLAGS(argv)
    if not flags.FLAGS["verbosity"].present:  # quiet start-up: no INFO logs unless -v 0
      flags.FLAGS.verbosity = logging.WARNING
    return rest
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    _bad_override(e)
  except Exception as e:  # noqa: BLE001 - the config file itself failed (syntax, its code)
    _bad_config_file(e)


def _bad_config_file(e: BaseException):
  """A --config file that is missing or fails to load: one line naming the file and why."""
  if isinstance(e, SyntaxError):
    why = f"{e.msg} (line {e.lineno} of {e.filename})"
  else:
    text = [l.strip() for l in str(e).splitlines() if l.strip()]
    why = text[-1] if text else ""
  print(f"config error: cannot load the --config file: {type(e).__name__}: {why}",
        file=sys.stderr)
  sys.exit(2)


def run():
  """Console-script entry point (`mta-train`) and `python train.py`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""Config validation (one test per kind of error, each asserting the field is named), every
experiment file loads, overrides and errors through train.py, exact parameter counts."""

import glob
import os

import pytest

import train_cli

from mta_jax.config import (ConfigError, MeshConfig, TrainConfig, check_types, validate,
                            validate_model)
from mta_jax.data import validate_data
from configs import lm_tiny, toy

ROOT = train_cli.ROOT


def toy_cfg() -> TrainConfig:
  return toy.get_config("mta")


def raises_naming(field, fn, *args):
  with pytest.raises(ConfigError) as e:
    fn(*args)
  assert field in str(e.value), str(e.value)
  return str(e.value)


# ----------------------------------------------------------------------------- one per kind


def test_wrong_type_names_field():
  cfg = toy_cfg()
  cfg.steps = "100"
  raises_naming("steps", validate, cfg)
  cfg = toy_cfg()
  cfg.optim.lr = "1e-3"
  raises_naming("optim.lr", validate, cfg)
  cfg = toy_cfg()
  cfg.data.batch_size = 8.0
  raises_naming("data.batch_size", validate, cfg)
  cfg = toy_cfg()
  cfg.model.attention.kq_layers = ("0",)
  raises_naming("kq_layers", validate, cfg)


def test_bad_choice_names_field():
  cfg = toy_cfg()
  cfg.optim.schedule = "exponential"
  msg = raises_naming("optim.schedule", validate, cfg)
  assert "cosine" in msg  # lists the allowed values
  cfg = toy_cfg()
  cfg.model.dtype = "float16"
  raises_naming("model.dtype", validate, cfg)


def test_heads_not_divisible_by_c_h():
  cfg = toy_cfg()
  cfg.model.attention.c_h = 3  # 2 heads
  raises_naming("model.attention.c_h", validate, cfg)


def test_even_key_kernel_rejected():
  cfg = toy_cfg()
  cfg.model.attention.c_k = 4
  raises_naming("model.attention.c_k", validate, cfg)


def test_batch_not_divisible_by_data_parallel():
  cfg = toy_cfg()
  cfg.data.batch_size = 60
  msg = raises_naming("data.batch_size", validate, cfg, 8)
  assert "mesh.data" in msg


def test_batch_not_divisible_by_processes():
  cfg = toy_cfg()
  cfg.data.batch_size = 63
  raises_naming("data.batch_size", validate, cfg, None, 2)


def test_mesh_does_not_match_devices():
  cfg = toy_cfg()
  cfg.mesh = MeshConfig(data=2, fsdp=2, tensor=1)
  msg = raises_naming("mesh.data", validate, cfg, 8)
  assert "8 are available" in msg


def test_mesh_two_fill_axes():
  cfg = toy_cfg()
  cfg.mesh = MeshConfig(data=-1, fsdp=-1, tensor=1)
  raises_naming("mesh.fsdp", validate, cfg, 8)


def test_heads_not_divisible_by_tensor():
  cfg = toy_cfg()  # 2 heads
  cfg.mesh = MeshConfig(data=2, fsdp=1, tensor=4)
  raises_naming("mesh.tensor", validate, cfg, 8)


def test_head_mixing_group_straddling_tensor_shards():
  cfg = toy_cfg()
  cfg.model.n_heads, cfg.model.d_model = 4, 128
  cfg.model.attention.head_mix_pre = True
  cfg.model.attention.c_h = 4  # one group of 4 heads cannot be split over tensor=2
  cfg.mesh = MeshConfig(data=-1, fsdp=1, tensor=2)
  msg = raises_naming("model.attention.c_h", validate, cfg, 8)
  assert "mesh.tensor" in msg
  cfg.model.attention.c_h = 2  # two groups of 2: one per shard
  validate(cfg, 8)


def test_warmup_longer_than_schedule():
  cfg = toy_cfg()
  cfg.steps, cfg.optim.warmup_steps = 10, 20
  raises_naming("optim.warmup_steps", validate, cfg)


def test_seq_len_beyond_max_len():
  cfg = toy_cfg()
  cfg.data.seq_len = cfg.model.max_len + 1
  raises_naming("data.seq_len", validate, cfg)


def test_toy_sample_longer_than_seq_len():
  cfg = toy_cfg()
  validate_data(cfg)
  cfg.data.toy.n_blocks += 1
  raises_naming("data.seq_len", validate_data, cfg)


def test_vocab_too_small_for_data():
  cfg = toy_cfg()
  cfg.model.vocab_size = 16
  raises_naming("model.vocab_size", validate_data, cfg)


def test_not_a_trainconfig():
  with pytest.raises(ConfigError, match="TrainConfig"):
    validate({"steps": 1})


# ----------------------------------------------------------------------------- experiment files


@pytest.mark.parametrize("arg", [None, "baseline", "mta_n8_all", "baseline_n8_first",
                                 "mta_n5_last", "mta_n5_first_paper", "baseline_n8_last_paper"])
def test_toy_configs_validate(arg):
  cfg = toy.get_config(arg)
  validate(cfg, 8)
  a = cfg.model.attention
  n = cfg.data.toy.block_len
  if cfg.name.startswith("toy_mta"):
    assert (a.pre_conv, a.post_conv, a.c_q, a.c_k) == (True, False, 2, 2 * n - 1)
    assert cfg.model.kq_layer_indices() == tuple(range(cfg.model.n_layers))
    assert not (a.head_mix_pre or a.head_mix_post or a.group_norm)
  else:
    assert not (a.pre_conv or a.post_conv or a.head_mix_pre or a.head_mix_post)
  if arg and "paper" in arg:
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_model) == (4, 2, 256)
    assert (cfg.data.toy.n_blocks, cfg.data.batch_size, cfg.steps) == (52, 64, 100_000)


def test_toy_config_rejects_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant part"):
    toy.get_config("mta_n5_middle")


@pytest.mark.parametrize("family", ["baseline", "talking_heads", "mta"])
def test_lm_tiny_configs_validate(family):
  validate(lm_tiny.get_config(family), 8)


def test_paper_presets_exist_and_are_well_formed():
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs",
                                                                     "paper_*_*.py")))
  want = sorted(f"paper_{s}_{f}.py" for s in ("300m", "550m", "880m", "1b")
                for f in ("baseline", "talking_heads", "mta"))
  assert names == want
  import importlib
  for name in want:
    cfg = importlib.import_module(f"configs.{name[:-3]}").get_config(None)
    check_types(cfg)
    validate_model(cfg.model)
    assert cfg.data.seq_len == 2048 and cfg.data.batch_size * 2048 == 262_144
    assert (cfg.optim.lr, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
        1.5e-4, 0.98, 0.05, 375)


# ----------------------------------------------------------------------------- via train.py


def train_py(*args, timeout=120):
  return train_cli.run(*args, timeout=timeout)


@pytest.mark.parametrize("preset,count", [("paper_880m_baseline", 876553728),
                                          ("paper_880m_mta", 876583320)])
def test_count_params_880m(preset, count):
  r = train_py(f"--config=configs/{preset}.py", "--mode=count_params")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().splitlines()[-1] == f"params: {count}"


def test_override_unknown_field_names_it():
  r = train_py("--config.optim.learning_rate=1e-3", "--mode=count_params")
  assert r.returncode != 0
  assert "learning_rate" in r.stderr and "config error" in r.stderr, r.stderr[-2000:]


def test_override_wrong_type_names_it():
  r = train_py("--config.steps=ten", "--mode=count_params")
  assert r.returncode != 0
  assert "config.steps" in r.stderr, r.stderr[-2000:]


def test_override_inconsistent_value_names_it(tmp_path):
  r = train_py("--config.model.attention.c_k=4", f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "model.attention.c_k" in r.stderr, r.stderr[-2000:]


def test_overrides_reach_the_config():
  r = train_py("--config=configs/toy.py:mta_n8_all", "--config.model.n_layers=3",
               "--config.model.attention.kq_layers=(0,2)", "--mode=count_params")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "n_layers=3" in r.stdout and "kq_layers=[0, 2]" in r.stdout

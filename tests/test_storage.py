"""Cloud storage without a network: `gs://` served by an in-memory fsspec file system, reached
through etils.epath exactly as a real bucket would be (gcsfs plays that part in production).

Covers the workdir files (metrics.jsonl, TensorBoard, PNGs, config.json, W&B id, profiles),
tokenizer files, prepared-dataset metadata, and the clear errors for an unreachable bucket and
for a file where a directory belongs.
"""

import json

import importlib

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mta_jax import metrics, profiling, storage, train_lib
from mta_jax.config import ConfigError
from mta_jax.data import prepare, sources, tokenizer

from test_tokenizers import write_tiktoken
from train_util import toy_run_config


class FakeGCS(MemoryFileSystem):
  """gs:// and gcs:// in memory (its own store, emptied per test)."""
  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]


_REGISTRY = importlib.import_module("fsspec.registry")._registry  # fsspec's own, writable


@pytest.fixture
def gcs():
  saved = {p: _REGISTRY.get(p) for p in FakeGCS.protocol}
  for p in FakeGCS.protocol:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  yield FakeGCS()
  for p, cls in saved.items():
    if cls is None:
      _REGISTRY.pop(p, None)
    else:
      fsspec.register_implementation(p, cls, clobber=True)
  FakeGCS.store.clear()


def _files(fs, prefix):
  return sorted(k[len(prefix):].lstrip("/") for k in fs.store if k.startswith(prefix))


def test_metrics_pictures_and_config_go_to_the_bucket(gcs):
  run = "gs://bucket/runs/a"
  w = metrics.MetricsWriter(run, 10, enabled=True)
  w.open(0)
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": 3.0 / step, "mfu": None})
  w.write(3, "eval", {"loss": 1.5, "seq_error": 0.25})
  assert w.plot().startswith(run)
  w.close()
  cfg = toy_run_config(3)
  train_lib.write_config(cfg, run)
  files = _files(gcs, run)
  assert {"metrics.jsonl", "loss_curve.png", "config.json"} <= set(files)
  assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
  lines = gcs.cat(f"{run}/metrics.jsonl").decode().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 3]
  assert gcs.cat(f"{run}/loss_curve.png")[:4] == b"\x89PNG"
  assert json.loads(gcs.cat(f"{run}/config.json"))["steps"] == 3
  # A resumed run appends (object stores cannot: the writer rewrites the object).
  w = metrics.MetricsWriter(run, 10, enabled=True)
  w.open(3)
  w.write(4, "train", {"loss": 0.5})
  w.close()
  lines = gcs.cat(f"{run}/metrics.jsonl").decode().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 3, 4]
  # Side by side comparison reads remote runs and writes a remote PNG.
  assert metrics.compare([run], "gs://bucket/cmp.png") == "gs://bucket/cmp.png"
  assert gcs.cat("gs://bucket/cmp.png")[:4] == b"\x89PNG"


def test_remote_append_is_throttled(gcs):
  f = storage.AppendFile("gs://bucket/m.jsonl", every=3600)
  f.write("a\n")  # the first write goes out at once (no upload yet this interval) ...
  f.write("b\n")  # ... later ones wait for the interval or close()
  assert gcs.cat("gs://bucket/m.jsonl") == b"a\n"
  f.close()
  assert gcs.cat("gs://bucket/m.jsonl") == b"a\nb\n"


def test_profile_is_copied_to_a_remote_workdir(gcs):
  import jax
  import jax.numpy as jnp
  prof = profiling.StepProfiler("1,1", 2, "gs://bucket/run", first_step=0, log=lambda _: None)
  prof.before(1)
  x = jax.jit(lambda a: a * 2)(jnp.ones(8))
  prof.after(1, x)
  files = _files(gcs, "gs://bucket/run/profile")
  assert any(f.endswith(".xplane.pb") for f in files), files


def test_tokenizer_files_read_from_the_bucket(gcs, tmp_path):
  write_tiktoken(tmp_path / "t.tiktoken")
  gcs.pipe("gs://bucket/tok/tokenizer.model", (tmp_path / "t.tiktoken").read_bytes())
  tok = tokenizer.Tokenizer("gs://bucket/tok/tokenizer.model")
  assert tok.kind == "tiktoken" and tok.decode(tok.encode("the cat")) == "the cat"
  with pytest.raises(ConfigError, match=r"data.tokenizer='gs://bucket/tok/nope.model': no such "
                                        r"file"):
    tokenizer.Tokenizer("gs://bucket/tok/nope.model")


def test_prepared_dataset_in_a_bucket_needs_a_gcsfuse_mount(gcs, tmp_path):
  (tmp_path / "a.txt").write_text("".join(f"doc {i}\n" for i in range(20)))
  local = prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "d"), "docs",
                          validation_fraction=0.1)
  for f in (tmp_path / "d" / "docs" / "1.0.0").iterdir():
    gcs.pipe(f"gs://bucket/data/docs/1.0.0/{f.name}", f.read_bytes())
  # The metadata is found through epath (newest version under the NAME folder) ...
  assert sources.resolve_prepared_dir("gs://bucket/data/docs") == "gs://bucket/data/docs/1.0.0"
  # ... and the ArrayRecord reader's need for local files is said plainly.
  with pytest.raises(ConfigError, match=r"data.path='gs://bucket/data/docs'.*needs local files; "
                                        r"mount the bucket with gcsfuse"):
    sources.open_prepared("gs://bucket/data/docs", "train")
  assert len(sources.open_prepared(local, "train")) == 18


def test_unreachable_bucket_and_file_for_a_directory(gcs, tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"^--workdir='.*file' is a file, not a directory"):
    storage.ensure_dir(str(tmp_path / "file"), "--workdir")
  gcs.pipe("gs://bucket/afile", b"x")
  with pytest.raises(ConfigError, match=r"^--workdir='gs://bucket/afile' is a file"):
    metrics.MetricsWriter("gs://bucket/afile", 10, enabled=True)
  with pytest.raises(ConfigError, match=r"data.path='gs://bucket/afile': is a file, not a "
                                        r"directory"):
    sources.resolve_prepared_dir("gs://bucket/afile")


def test_unreachable_storage_is_one_line(monkeypatch, tmp_path):
  """No fake here: s3:// without s3fs cannot be reached, like a bucket without credentials."""
  pytest.importorskip("etils.epath")
  if _REGISTRY.get("s3") is not None:
    pytest.skip("an s3 implementation is registered")
  try:
    import s3fs  # noqa: F401
    pytest.skip("s3fs is installed: s3:// might be reachable")
  except ImportError:
    pass
  with pytest.raises(ConfigError, match=r"^--workdir='s3://nobucket/run' cannot be written "
                                        r"\(ImportError: .*\); check the path"):
    storage.ensure_dir("s3://nobucket/run", "--workdir")
  with pytest.raises(ConfigError, match=r"^data.tokenizer='s3://nobucket/t' cannot be reached"):
    tokenizer.Tokenizer("s3://nobucket/t")
  with pytest.raises(ConfigError, match=r"^data.path='s3://nobucket/d' cannot be read"):
    sources.resolve_prepared_dir("s3://nobucket/d")


def test_export_to_a_bucket_and_back(gcs, tmp_path):
  """write_export builds locally and uploads (manifest last); read_manifest verifies every file
  through epath; load_exported reads the safetensors copy from the bucket. (The Orbax params
  copy is read by Orbax's own GCS driver, which a fake bucket cannot serve.)"""
  import jax
  from flax import nnx

  import ckpt_util as cu
  from mta_jax import export, tree_io
  from mta_jax.model import TransformerLM
  cfg = cu.tiny_config()
  model = TransformerLM(cfg.model, rngs=nnx.Rngs(0))
  flat = {p: np.asarray(jax.device_get(v))
          for p, v in tree_io.flatten(nnx.state(model, nnx.Param)).items()}
  write_tiktoken(tmp_path / "tok")
  gcs.pipe("gs://bucket/tok/tokenizer.model", (tmp_path / "tok").read_bytes())
  out = export.write_export("gs://bucket/exports/a", flat, cfg, step=7,
                            tokenizer="gs://bucket/tok/tokenizer.model")
  assert out == "gs://bucket/exports/a"
  files = _files(gcs, out)
  assert {"export.json", "config.json", "model.safetensors", "tokenizer.model"} <= set(files)
  assert any(f.startswith("params/") for f in files)
  assert export.read_manifest(out)["step"] == 7  # every sha256 checked through epath
  ex = export.load_exported(out, from_safetensors=True)
  got = tree_io.flatten(nnx.state(ex.model, nnx.Param))
  for p, v in flat.items():
    np.testing.assert_array_equal(np.asarray(jax.device_get(got[p])), v)
  assert ex.tokenizer == f"{out}/tokenizer.model"
  assert tokenizer.Tokenizer(ex.tokenizer).kind == "tiktoken"
  # A flipped byte in the bucket is caught; a file where the export directory belongs too.
  blob = bytearray(gcs.cat(f"{out}/model.safetensors"))
  blob[-1] ^= 1
  gcs.pipe(f"{out}/model.safetensors", bytes(blob))
  with pytest.raises(export.ExportError, match="model.safetensors does not match its checksum"):
    export.read_manifest(out)
  gcs.pipe("gs://bucket/exports/file", b"x")
  with pytest.raises(export.ExportError, match="is a file, not a directory"):
    export.write_export("gs://bucket/exports/file", flat, cfg, step=7, tokenizer=None)

"""Packaging: pyproject.toml agrees with the code and with requirements.txt, the shipped configs
are found from any directory, and (slow) `pip install .` gives working console scripts."""

import ast
import os
import shutil
import site
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement

from mta_jax import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_console_scripts_and_packages():
  proj = _pyproject()
  for name, target in proj["project"]["scripts"].items():
    module, func = target.split(":")
    if module == "mta_jax.main":  # importing it defines absl flags: read its source instead
      tree = ast.parse(open(os.path.join(ROOT, "mta_jax", "main.py")).read())
      assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name
      continue
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func)), name
  assert set(proj["project"]["scripts"]) == {"mta-train", "mta-prepare", "mta-tokenizer",
                                             "mta-generate", "mta-sweep"}
  # Every package directory is listed (a new subpackage would otherwise be left out silently).
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
           for d, _, files in os.walk(os.path.join(ROOT, "mta_jax")) if "__init__.py" in files}
  listed = set(proj["tool"]["setuptools"]["packages"])
  found |= {"mta_jax." + os.path.relpath(d, ROOT).replace(os.sep, ".")
            for d, _, files in os.walk(os.path.join(ROOT, "configs")) if "__init__.py" in files}
  assert found == listed
  assert proj["tool"]["setuptools"]["package-dir"] == {"mta_jax.configs": "configs"}
  assert {"tpu", "cuda12", "test"} <= set(proj["project"]["optional-dependencies"])


def test_requirements_pins_fall_inside_the_pyproject_ranges():
  proj = _pyproject()
  ranges = {}
  for r in proj["project"]["dependencies"] + [
      d for ds in proj["project"]["optional-dependencies"].values() for d in ds]:
    req = Requirement(r)
    ranges.setdefault(req.name.lower().replace("_", "-"), []).append(req.specifier)
  pins = {}
  for line in open(os.path.join(ROOT, "requirements.txt")):
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
      pins[req.name.lower().replace("_", "-")] = spec.version
  for name, specs in ranges.items():
    if name in pins:
      for s in specs:
        assert s.contains(pins[name]), f"{name}=={pins[name]} is outside {s}"
  missing = set(ranges) - set(pins) - {"gcsfs"}  # gcsfs: only for gs:// users, not tested
  assert not missing, f"pin these in requirements.txt: {missing}"


def test_config_paths_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
  shipped = paths.configs_dir()
  assert os.path.isfile(os.path.join(shipped, "paper_880m_mta.py"))
  monkeypatch.chdir(tmp_path)
  r = paths.resolve_config_arg
  assert r(["x", "--config=configs/toy.py:baseline", "--config.steps=3"], shipped) == [
      "x", f"--config={shipped}/toy.py:baseline", "--config.steps=3"]
  assert r(["x", "--config", "toy"], shipped) == ["x", "--config", f"{shipped}/toy.py"]
  assert r(["x", "--config=paper_1b_mta.py"], shipped) == [
      "x", f"--config={shipped}/paper_1b_mta.py"]
  # A file that exists where it is named wins; an unknown one is left for config_flags to report.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "toy.py").write_text("")
  assert r(["x", "--config=configs/toy.py"], shipped) == ["x", "--config=configs/toy.py"]
  assert r(["x", "--config=configs/nope.py"], shipped) == ["x", "--config=configs/nope.py"]


@pytest.mark.slow
def test_pip_install_gives_working_commands(tmp_path):
  """`pip install .` into a throwaway venv (dependencies borrowed from this environment through
  a .pth file, no network), then the commands from a directory without a checkout."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src)
  for name in ("mta_jax", "configs"):
    shutil.copytree(os.path.join(ROOT, name), src / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path("
                            "'purelib'))"], capture_output=True, text=True, check=True).stdout
  with open(os.path.join(purelib.strip(), "borrowed.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                      "--no-index", "-q", str(src)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop("PYTHONPATH", None)

  def cmd(*args):
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)

  r = cmd("python", "-c", "import mta_jax; print(mta_jax.__file__)")
  assert str(venv) in r.stdout, "the installed copy is imported, not the checkout"
  r = cmd("mta-train", "--config=configs/paper_880m_mta.py", "--mode=count_params")
  assert r.returncode == 0 and "params: 876583320" in r.stdout, r.stderr[-2000:]
  r = cmd("mta-train", "--config=toy:baseline", "--mode=count_params")
  assert r.returncode == 0 and r.stdout.strip().endswith("params: 264768"), r.stderr[-2000:]
  assert "Unable to initialize backend" not in r.stderr  # quiet start-up
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(40)]
  (elsewhere / "a.txt").write_text("".join(" ".join(rng.choice(words, 12)) + "\n"
                                           for _ in range(60)))
  r = cmd("mta-prepare", "--input=a.txt", "--output=data", "--name=cats")
  assert r.returncode == 0 and (elsewhere / "data" / "cats" / "1.0.0").is_dir(), r.stderr
  r = cmd("mta-tokenizer", "--data=data/cats", "--output=tok/sp", "--vocab_size=60",
          "--model_type=bpe", "--quiet")
  assert r.returncode == 0, r.stderr[-2000:]
  r = cmd("mta-tokenizer", "--inspect=tok/sp.model")
  assert r.returncode == 0 and "sentencepiece, vocabulary 60" in r.stdout

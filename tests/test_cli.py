"""The commands' flag handling (mta_jax/cli.py): absl flags, each command on its own FlagValues,
`--help`, one-line errors with exit status 2, and the console-script path through absl.app."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
from absl import flags

from mta_jax import cli, generate, metrics, sweep, viz
from mta_jax.data import prepare, stdlib_docs, tokenizer
from mta_jax.evaluation import harness, needle, perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {prepare: "--input", tokenizer: "--inspect", stdlib_docs: "--root", sweep: "--launch",
            generate: "--prompt", viz: "--text", metrics: "--labels", harness: "--tasks",
            needle: "--needles", perplexity: "--text_file"}


@pytest.mark.parametrize("module", list(COMMANDS), ids=lambda m: m.__name__)
def test_help_and_bad_flags(module, capsys):
  assert module.main(["--help"]) == 0
  flag = COMMANDS[module]
  assert flag.lstrip("-") + ":" in capsys.readouterr().out  # its own flags are listed
  assert module.main(["--no_such_flag=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert "no_such_flag" in err and "\n" not in err


def test_each_call_starts_from_the_defaults():
  fv = flags.FlagValues()
  flags.DEFINE_multi_string("prompt", [], "", flag_values=fv)
  flags.DEFINE_bool("json", False, "", flag_values=fv)
  seen = []
  main = lambda rest: seen.append((list(fv.prompt), fv.json, rest)) or 0
  assert cli.run(main, fv, ["--prompt=a", "--json"], "p", "") == 0
  assert cli.run(main, fv, ["--prompt=b"], "p", "") == 0  # neither `a` nor --json stays
  assert cli.run(main, fv, ["x"], "p", "", positional=True) == 0
  assert seen == [(["a"], True, []), (["b"], False, []), ([], False, ["x"])]
  assert cli.run(main, fv, ["x"], "p", "") == 2  # a command without positional arguments


def test_several_missing_flags_are_one_line(capsys):
  assert prepare.main(["--seed=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--input" in err and "--output" in err and "--name" in err and "\n" not in err


def _command_line(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": ROOT})


def test_console_script_path_through_absl_app(tmp_path):
  # What the `mta-sweep` script does: main() on sys.argv, positional argument first.
  r = _command_line("import sys; from mta_jax import sweep; "
                    f"sys.argv = ['mta-sweep', {str(tmp_path / 'none.py')!r}, '--seeds=1']; "
                    "sys.exit(sweep.main())")
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [f"sweep error: sweep file "
                                           f"{str(tmp_path / 'none.py')!r} does not exist."]
  r = _command_line("import sys; from mta_jax.data import stdlib_docs; "
                    "sys.argv = ['x', '--output', 'out.txt']; sys.exit(stdlib_docs.main())")
  assert r.returncode == 2 and "must end in .jsonl" in r.stderr, r.stderr

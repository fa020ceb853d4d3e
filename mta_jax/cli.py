"""Flag handling shared by the commands (prepare, tokenizer, generate, sweep, viz, evaluation).

They use absl flags, as train.py does, with one difference: each command defines its flags on
its own `flags.FlagValues`, not on absl's global `flags.FLAGS`, so that commands imported
together (one test process; `python -m mta_jax.sweep`, whose `__main__` imports
`mta_jax.sweep` again) never clash on a shared name such as --output.

A command is `main(argv=None) -> int`: with `argv` (the arguments after the program name) it
parses them and returns the exit status, which is how tests and other code call it; with
`argv=None` (the console scripts in pyproject.toml, `python -m ...`) it runs under
`absl.app.run` on the process's command line and exits with that status. `--help` prints the
command's description and flags; a bad or missing flag is one line and exit status 2.
"""

import sys
from typing import Callable, Optional, Sequence

from absl import app, flags, logging

_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


class UsageError(Exception):
  """Arguments the flags accept but the command does not (e.g. unexpected positional ones)."""


def parse(fv: flags.FlagValues, argv: Sequence[str], prog: str, doc: str) -> list[str]:
  """Parse `argv` (program name first) into `fv`, from the defaults up: a second call in the
  same process does not keep the first call's values. Returns the positional arguments."""
  own = list(argv[1:])
  if "--" in own:
    own = own[:own.index("--")]
  if any(a in _HELP for a in own):
    print(f"{doc.strip()}\n\nflags:\n{fv.get_help()}")
    sys.exit(0)
  fv.unparse_flags()
  try:
    return fv(list(argv))[1:]
  except flags.Error as e:
    fail(prog, e)


def fail(prog: str, e: object):
  """One line (absl lists several missing flags on several), exit status 2."""
  why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
  print(f"{prog}: error: {why} (--help lists the flags)", file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[list[str]], int], fv: flags.FlagValues, argv: Optional[Sequence[str]],
        prog: str, doc: str, positional: bool = False) -> int:
  """`main(positional arguments)` with `fv` parsed from `argv` (no program name); with
  `argv=None`, under absl.app on sys.argv (never returns). `positional=False`: a command that
  takes none says so instead of ignoring them."""

  def call(rest: list[str]) -> int:
    if rest and not positional:
      fail(prog, f"unexpected arguments {rest}; every argument is a --flag")
    try:
      return main(rest)
    except UsageError as e:
      fail(prog, e)

  if argv is not None:
    try:
      return call(parse(fv, [prog, *argv], prog, doc))
    except SystemExit as e:  # bad flags / --help: the status, as the command line gets it
      return e.code if isinstance(e.code, int) else 2

  def flags_parser(args: list[str]) -> list[str]:
    rest = parse(fv, args, prog, doc)
    flags.FLAGS.mark_as_parsed()  # absl.app's own flags: defaults
    flags.FLAGS.verbosity = logging.WARNING  # quiet start-up, as train.py
    return rest

  app.run(call, flags_parser=flags_parser)
  return 0  # not reached: app.run exits with main's status

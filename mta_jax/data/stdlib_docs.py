"""An offline English corpus: the docstrings of the running Python's standard library.

    python -m mta_jax.data.stdlib_docs --output=data/stdlib_docs.jsonl
    python -m mta_jax.data.prepare --input=data/stdlib_docs.jsonl --output=data --name=stdlib_docs
    python -m mta_jax.data.tokenizer --data=data/stdlib_docs --output=data/stdlib_sp \
        --vocab_size=2000

Which files: every `*.py` under `sysconfig.get_paths()["stdlib"]` (the directory of `os.py`),
recursively, in sorted path order, EXCEPT directories named `test`, `tests`, `idle_test`,
`site-packages`, `dist-packages` and `__pycache__` (test suites are code, not prose, and
site-packages is not the standard library). Files that do not parse (a few templates) are
skipped and counted. One document per module: the module docstring, then every class and
function docstring in source order (ast.get_docstring, cleaned), separated by blank lines.
Modules without any docstring are skipped. The result depends only on the Python version, so
record it (it is printed) next to results.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from typing import Iterator, Optional

from absl import flags

from mta_jax import cli

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                           "__pycache__"})


def stdlib_files(root: Optional[str] = None) -> list[str]:
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  return sorted(out)


def module_docs(source: str) -> list[str]:
  """Module, class and function docstrings of one source file, in source order."""
  tree = ast.parse(source)
  docs = []
  for node in ast.walk(tree):  # breadth-first; sorted by line below for source order
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and doc.strip():
        docs.append((getattr(node, "lineno", 0), doc.strip()))
  return [d for _, d in sorted(docs, key=lambda x: x[0])]


def documents(root: Optional[str] = None) -> Iterator[tuple[str, str]]:
  """(relative path, document text) per module with docstrings; `skipped` files are counted."""
  root = root or sysconfig.get_paths()["stdlib"]
  for path in stdlib_files(root):
    try:
      with open(path, encoding="utf-8") as f:
        docs = module_docs(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      documents.skipped += 1
      continue
    if docs:
      yield os.path.relpath(path, root), "\n\n".join(docs)


documents.skipped = 0


_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_string("output", None, "a .jsonl file: one {'text', 'path'} per module",
                    flag_values=_FLAGS)
flags.DEFINE_string("root", "", "library directory (default: this Python's stdlib)",
                    flag_values=_FLAGS)
flags.mark_flag_as_required("output", flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
  if not args.output.endswith(".jsonl"):
    print("error: --output must end in .jsonl (what mta_jax.data.prepare reads).",
          file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  n, chars = 0, 0
  with open(args.output, "w", encoding="utf-8") as f:
    for rel, text in documents(args.root or None):
      f.write(json.dumps({"text": text, "path": rel}) + "\n")
      n += 1
      chars += len(text)
  print(f"wrote {n} documents ({chars:,} characters) from the standard library of Python "
        f"{sys.version.split()[0]} ({documents.skipped} files skipped) to {args.output}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m mta_jax.data.stdlib_docs`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.data.stdlib_docs", __doc__)


if __name__ == "__main__":
  sys.exit(main())

"""The paper's 300M model, diff family (DIFF Transformer: half the heads, twice the width);
training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("300m", "diff", arg)

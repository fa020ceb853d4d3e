"""The paper's 1B model, mta family (paper Table 7); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("1b", "mta", arg)

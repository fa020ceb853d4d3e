"""The paper's 1B talking_heads model (paper Table 7); training setup: configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("1b", "talking_heads", arg)

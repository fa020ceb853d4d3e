"""The paper's 300M talking_heads model (paper Table 7); training setup: configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("300m", "talking_heads", arg)

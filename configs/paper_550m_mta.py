"""The paper's 550M model, mta family (paper Table 7); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("550m", "mta", arg)

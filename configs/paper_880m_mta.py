"""The paper's 880M model, mta family (paper Table 7); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("880m", "mta", arg)

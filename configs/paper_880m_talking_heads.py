"""The paper's 880M model, talking_heads family (paper Table 7); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("880m", "talking_heads", arg)

"""The paper's 880M model, baseline family (paper Table 7); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("880m", "baseline", arg)

"""The paper's 880M model, baseline family (MTA_SPEC Sec. 9); training setup in configs/paper.py."""

from configs import paper


def get_config(arg=None):
  return paper.get("880m", "baseline", arg)

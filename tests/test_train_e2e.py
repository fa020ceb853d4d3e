"""`python train.py` end to end on a seconds-long toy task: progress lines, eval, the files a run
leaves in its workdir (resolved config, JSONL metrics, TensorBoard events, loss-curve PNG)."""

import json
import os

import train_cli

TINY = ["--config=configs/toy.py:mta_n3_first", "--config.data.toy.n_blocks=3",
        "--config.data.seq_len=15", "--config.model.max_len=15", "--config.model.d_model=32",
        "--config.model.n_layers=2", "--config.data.batch_size=16",
        "--config.data.eval_batch_size=16", "--config.data.toy.n_test=40", "--config.steps=6",
        "--config.log_every=2", "--config.eval_every=3", "--config.optim.warmup_steps=2"]


def test_train_py_runs_and_writes_workdir(tmp_path):
  workdir = tmp_path / "run"
  r = train_cli.run(*TINY, f"--workdir={workdir}", check=True)
  out = r.stdout
  assert "train step compiled in" in out and "compiled memory per device" in out
  assert "step 2/6 | loss" in out and "tok/s" in out and "ETA" in out
  assert "eval @ step 3" in out and "eval @ step 6" in out
  assert "final sequence error rate" in out

  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["steps"] == 6 and cfg["model"]["d_model"] == 32
  assert cfg["model"]["attention"]["c_k"] == 5  # 2N - 1 for N = 3

  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "seq_error", "token_acc"):
    assert key in train[0], key
  assert evals[-1]["seqs"] == 40  # the padded last eval batch is not scored
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert (workdir / "loss_curve.png").stat().st_size > 1000

  # --mode=eval restores the final checkpoint and reproduces the final eval.
  r = train_cli.run(*TINY, f"--workdir={workdir}", "--mode=eval", check=True)
  assert "eval @ step 6" in r.stdout
  got = float(r.stdout.split("seq_error ")[1].split(",")[0].split()[0])
  assert abs(got - evals[-1]["seq_error"]) < 1e-6

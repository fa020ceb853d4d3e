"""Evaluation of trained models: log-likelihood scoring, an lm-evaluation-harness adapter,
multi-needle retrieval and perplexity by document position.

  scoring.Scorer            sum log p(continuation | context), greedy check, per-token NLL
  lm_eval_adapter.MTALM     lm_eval's LM interface (loglikelihood, loglikelihood_rolling,
                            generate_until); `python -m mta_jax.evaluation.harness`
  needle                    `python -m mta_jax.evaluation.needle`: accuracy by needle count and
                            depth, JSON + heat-map PNG
  perplexity                `python -m mta_jax.evaluation.perplexity`: NLL by position bucket
"""

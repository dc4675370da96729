"""KETCHUP on XSum (TFDS `xsum`), K=4; the paper's best K for XSum was 2.

    python -m ketchup_jax.main --config=configs/xsum_k4.py --workdir=runs/xsum
    # K=2 as in the authors' script:  --config.rl.k=2
"""

from configs import paper


def get_config():
  # Authors' max lengths 512/512; summaries fit comfortably in 128 tokens.
  c = paper.get_config(task="xsum", k=4, max_source_len=512,
                       max_target_len=128)
  c.task.options.prefix = "summarize: "
  return c

"""KETCHUP on GSM8K (TFDS `gsm8k`) with calculator-annotated steps, K=8.

    python -m ketchup_jax.main --config=configs/gsm8k_k8.py --workdir=runs/gsm8k
"""

from configs import paper


def get_config():
  c = paper.get_config(task="gsm8k", k=8, max_source_len=256,
                       max_target_len=256)
  return c

"""KETCHUP on Europarl English -> Dutch, K=4 (the paper's best K for T5).

The data are files you point at (TSV `en<TAB>nl` or JSONL `{"en", "nl"}`):

    python -m ketchup_jax.main --config=configs/europarl_en_nl_k4.py \
        --workdir=runs/en_nl --config.task.options.paths=data/europarl_{split}.tsv
"""

from configs import paper


def get_config():
  c = paper.get_config(task="europarl_en_nl", k=4, max_source_len=256,
                       max_target_len=256)
  c.task.options.paths = "data/europarl_en_nl_{split}.tsv"
  c.task.options.prefix = "translate English to Dutch: "
  return c

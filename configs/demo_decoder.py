"""`make demo` with decoder-only models (Qwen2-shaped, from scratch).

    python -m ketchup_jax.main --config=configs/demo_decoder.py --workdir=runs/demo_decoder

The same task, tokenizer, stages, budget and RL recipe as `configs/demo.py`
(teacher SFT, SeqKD, then RL with K = 1 and K = 4, validation every 8
updates keeping the best, all rows on the test split). The models are
random Qwen2-shaped decoders (q/k/v bias, tied embeddings, GQA): the
teacher 2 layers of width 128, the student 1 layer of width 32. The prompt
is the task's prefix and the English source; the Dutch completion follows.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  for role in ("teacher", "student"):
    c[role].init_from = "scratch:qwen2-tiny"
    c[role].overrides = type(c[role].overrides)()
  c.teacher.overrides.hidden_size = 128
  c.teacher.overrides.intermediate_size = 256
  c.teacher.overrides.num_hidden_layers = 2
  c.teacher.overrides.num_attention_heads = 4
  c.teacher.overrides.num_key_value_heads = 2
  c.teacher.overrides.head_dim = 32
  c.student.overrides.hidden_size = 32
  c.student.overrides.intermediate_size = 64
  c.student.overrides.num_hidden_layers = 1
  c.student.overrides.num_attention_heads = 4
  c.student.overrides.num_key_value_heads = 2
  c.student.overrides.head_dim = 8
  # Prompt + completion in one sequence.
  c.max_source_len = 24
  return c

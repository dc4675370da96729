"""`configs/smoke.py` with decoder-only models: every stage in seconds.

Teacher and student are random Qwen2-shaped decoders (`scratch:qwen2-tiny`,
q/k/v bias, tied embeddings, GQA 4 / 2 heads); the prompt (the task's
prefix and source, no EOS) is followed by the completion, and every loss,
rollout and teacher score is on the completion positions only.
"""

from configs import smoke


def get_config():
  c = smoke.get_config()
  for role in ("teacher", "student"):
    c[role].init_from = "scratch:qwen2-tiny"
    c[role].overrides = type(c[role].overrides)()  # T5's fields do not apply
  c.teacher.overrides.num_hidden_layers = 1
  c.student.overrides.num_hidden_layers = 1
  c.teacher.overrides.hidden_size = 64
  c.teacher.overrides.intermediate_size = 128
  return c

"""The embedded demo (`make demo`): KETCHUP on numbers_en_nl, no downloads.

A teacher is trained from scratch on English -> Dutch number words, a smaller
student is pre-distilled from it (SeqKD), and from that same checkpoint RL
runs with K=1 (LLMR) and K=4 (KETCHUP), same seed and step budget. RL uses
the recipe that gained most on validation in issue 13's 3-seed ablation
(docs/experiments.md, "What makes RL help"), which is the authors' (SPEC
§4.3): greedy rollouts, the pi-weighted loss, lr 1e-5 constant, no gradient
clipping, validation every 8 updates keeping the best. All four models are
evaluated on the test split; selection used the validation split only.
Sized for a 2-core CPU.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task.name = "numbers_en_nl"
  c.task.options.max_number = 9999
  c.tokenizer.kind = "word"
  c.tokenizer.vocab_size = 512
  c.max_source_len = 24
  c.max_target_len = 16

  c.teacher.init_from = "scratch:tiny"
  c.teacher.overrides.d_model = 128
  c.teacher.overrides.d_ff = 256
  c.teacher.overrides.num_heads = 4
  c.teacher.overrides.d_kv = 32
  c.teacher.overrides.num_layers = 2
  c.teacher.overrides.num_decoder_layers = 2

  c.student.init_from = "scratch:tiny"
  # A quarter of the teacher's width and half its depth: a real capacity gap.
  c.student.overrides.d_model = 32
  c.student.overrides.d_ff = 64
  c.student.overrides.num_heads = 4
  c.student.overrides.d_kv = 8
  c.student.overrides.num_layers = 1
  c.student.overrides.num_decoder_layers = 1

  c.teacher_sft.steps = 1200
  c.teacher_sft.batch_size = 64
  c.teacher_sft.learning_rate = 3e-3
  c.teacher_sft.warmup_steps = 100

  c.predistill.method = "seqkd"
  c.predistill.steps = 300
  c.predistill.batch_size = 64
  c.predistill.learning_rate = 3e-3
  c.predistill.warmup_steps = 50
  c.predistill.max_decode_len = 16

  c.rl.ks = (1, 4)
  c.rl.steps = 150
  c.rl.batch_size = 32
  c.rl.learning_rate = 1e-5
  c.rl.schedule = "constant"
  c.rl.max_grad_norm = 0.0
  c.rl.max_decode_len = 16
  c.rl.temperature = 0.0
  c.rl.weight = "reference_compat"
  c.rl.baseline = "none"
  c.rl.eval_every = 8
  c.rl.select = "best"
  c.validation.max_examples = 512

  c.eval.batch_size = 256
  c.eval.max_decode_len = 16
  c.eval.diag_batches = 8
  c.checkpoint_every = 250
  c.log_every = 50
  return c

"""Every stage in seconds on 2 CPU cores: the configuration tests and CI use."""

from configs import default


def get_config():
  c = default.get_config()
  c.task.options.max_number = 299
  c.tokenizer.kind = "word"
  c.tokenizer.vocab_size = 256
  c.max_source_len = 24
  c.max_target_len = 16
  # One padded shape per stage: one compile each.
  c.source_buckets = (24,)
  c.target_buckets = (16,)
  # One layer each side: compile time, not run time, dominates a smoke run.
  for role in ("teacher", "student"):
    c[role].overrides.num_layers = 1
    c[role].overrides.num_decoder_layers = 1
  for stage in ("teacher_sft", "predistill", "rl"):
    c[stage].batch_size = 8
    c[stage].steps = 3
    c[stage].learning_rate = 1e-3
  c.predistill.max_decode_len = 12
  c.rl.k = 2
  c.rl.max_decode_len = 12
  c.rl.unfinished = "terminal"
  # The tests check the step, not selection (tests that want validation
  # turn it on): no validation, the last update exported.
  c.rl.eval_every = 0
  c.rl.select = "last"
  c.rl.weight = "none"
  c.rl.schedule = "linear"
  c.rl.max_grad_norm = 1.0
  c.rl.temperature = 1.0
  c.eval.batch_size = 16
  c.eval.max_examples = 16
  c.eval.max_decode_len = 12
  c.eval.diag_ks = (1, 2, 4)
  c.eval.diag_batches = 1
  c.checkpoint_every = 2
  c.log_every = 1
  return c

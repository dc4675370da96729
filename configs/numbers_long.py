"""The long-rollout embedded setting: numbers_en_nl below 10 000, in bytes.

    python -m ketchup_jax.main --config=configs/numbers_long.py \
        --workdir=runs/numbers_long

English number words to Dutch, byte tokenizer: targets are 31 bytes on
average (at most 40, plus EOS), so RL rollouts run about 32 tokens and K up
to 16 stays below T (issue 13; the demo's word-level rollouts are at most 9
tokens, where K >= 8 is already one jump). 7,958 training numbers, spelled
byte by byte: the teacher has to learn the spelling rules, and its test
score says how well its logits generalise off the training set. The teacher SFT stage validates every 100 updates and keeps the
best (early stopping on validation). Models are the demo's (teacher d128 2+2
layers, student d32 1+1). Sized for the 2-core CPU.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.task.options.max_number = 9999
  c.tokenizer.kind = "byte"
  c.tokenizer.vocab_size = 0
  c.max_source_len = 72
  c.max_target_len = 44
  # One padded shape per stage: one compile each.
  c.source_buckets = (72,)
  c.target_buckets = (44,)

  c.teacher_sft.steps = 1200
  c.teacher_sft.batch_size = 64
  c.teacher_sft.learning_rate = 3e-3
  c.teacher_sft.warmup_steps = 100
  c.teacher_sft.eval_every = 100
  c.teacher_sft.select = "best"

  c.predistill.steps = 300
  c.predistill.max_decode_len = 44

  c.rl.ks = (1, 4, 16)
  c.rl.steps = 150
  c.rl.batch_size = 32
  c.rl.learning_rate = 1e-5
  c.rl.schedule = "constant"
  c.rl.max_decode_len = 44
  c.rl.eval_every = 8
  c.rl.select = "best"

  c.validation.max_examples = 256
  c.eval.max_examples = 512
  c.eval.batch_size = 256
  c.eval.max_decode_len = 44
  c.eval.diag_batches = 4
  c.log_every = 50
  c.checkpoint_every = 250
  return c

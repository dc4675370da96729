"""The paper's decoder-only setting: Qwen1.5-4B teacher -> Qwen1.5-0.5B student.

    python -m ketchup_jax.main --config=configs/paper_qwen.py:xsum --workdir=runs/qwen_xsum
    python -m ketchup_jax.main --config=configs/paper_qwen.py:europarl_en_nl \
        --workdir=runs/qwen_en_nl --config.task.options.paths=data/europarl_en_nl_{split}.tsv
    python -m ketchup_jax.main --config=configs/paper_qwen.py:gsm8k --workdir=runs/qwen_gsm8k

Teacher and student are local HF directories (`model_type: qwen2`), e.g.
`huggingface-cli download Qwen/Qwen1.5-4B --local-dir checkpoints/qwen1.5-4b`;
the tokenizer is the teacher's. K is the paper's best for Qwen1.5 on each
task (SPEC §4: 2 / 2 / 16 on XSum / EN-NL / GSM8K). The prompt is the task
prefix and the source, without a chat template (SPEC §4: the authors'
`prefix + question`); the teacher scores the completion positions only.
Everything else is `configs/paper.py`: the authors' RL recipe (SPEC §4.3).
"""

from configs import default
from configs import paper

# task -> (K, max source tokens, max target tokens, prompt prefix)
TASKS = {
    "xsum": (2, 512, 128, "summarize: "),
    "europarl_en_nl": (2, 256, 256, "translate English to Dutch: "),
    "gsm8k": (16, 256, 256, ""),
}


def get_config(task: str = "xsum"):
  if task not in TASKS:
    raise ValueError(f"configs/paper_qwen.py:<task> must be one of "
                     f"{sorted(TASKS)}, got {task!r}")
  k, source_len, target_len, prefix = TASKS[task]
  c = paper.get_config(task=task, k=k, max_source_len=source_len,
                       max_target_len=target_len)
  if prefix:
    c.task.options.prefix = prefix
  if task == "europarl_en_nl":
    c.task.options.paths = "data/europarl_en_nl_{split}.tsv"
  # Qwen's own BPE tokenizer, from the teacher's directory.
  c.tokenizer.path = "checkpoints/qwen1.5-4b"
  c.tokenizer.chat_template = False
  c.teacher = default.model("checkpoints/qwen1.5-4b", dtype="bfloat16")
  c.student = default.model("checkpoints/qwen1.5-0.5b", dtype="bfloat16")
  return c

"""Does the arith teacher learn in a CPU budget? (pipeline config)

    nice -n 15 python -m ketchup_jax.main \
        --config=configs/experiments/arith_teacher.py --workdir=runs/arith_teacher

Teacher SFT only (configs/experiments/common.arith_base), then greedy
evaluation (gsm8k_accuracy on 100 test problems).
"""

from configs.experiments import common


def get_config():
  c = common.arith_base()
  c.stages = "teacher_sft,eval"
  return c

"""Default configuration: every field, with what it means.

Task configs start from `get_config()` and override fields; the command line
overrides them again, e.g. `--config.rl.k=8 --config.rl.steps=500`.
"""

import ml_collections


def optim(*, steps: int, learning_rate: float, batch_size: int,
          schedule: str = "linear", warmup_steps: int = 0,
          weight_decay: float = 0.0, max_grad_norm: float = 1.0,
          grad_accum: int = 1, eval_every: int = 0,
          select: str = "last") -> ml_collections.ConfigDict:
  """The optimizer fields every training stage has."""
  return ml_collections.ConfigDict(dict(
      # Optimizer updates in the stage.
      steps=steps,
      # Global batch size of one micro-batch (rows, split over data x fsdp).
      batch_size=batch_size,
      # Peak learning rate of AdamW.
      learning_rate=learning_rate,
      # "linear" (decay to 0 after warmup) or "constant".
      schedule=schedule,
      # Linear warmup updates.
      warmup_steps=warmup_steps,
      # AdamW decoupled weight decay.
      weight_decay=weight_decay,
      # Global-norm gradient clipping; 0 disables.
      max_grad_norm=max_grad_norm,
      # Adam's epsilon (added to sqrt(v)): larger values stop Adam from
      # scaling near-zero gradients up to full learning-rate steps.
      eps=1e-8,
      # Micro-batches per optimizer update (gradient accumulation).
      grad_accum=grad_accum,
      # Decode the validation split greedily after every N optimizer updates
      # and after the last (config.validation); 0 = never.
      eval_every=eval_every,
      # Which parameters the stage exports: "last", or "best" on validation
      # (needs eval_every > 0; the starting point never competes).
      select=select,
  ))


def model(init_from: str, *, dtype: str = "float32",
          param_dtype: str = "float32") -> ml_collections.ConfigDict:
  """Where a model comes from and how it computes."""
  return ml_collections.ConfigDict(dict(
      # "scratch:<size>" (random init; sizes: tiny, small, base, large, xl,
      # t5-small, ...), "stage:<name>" (the model a previous stage of this
      # run exported), or an HF directory / hub name (config.json +
      # model.safetensors).
      init_from=init_from,
      # Compute dtype: "bfloat16" on TPU/GPU, "float32" on CPU.
      dtype=dtype,
      # Parameter (master weight) dtype. A frozen teacher can be stored in
      # "bfloat16": half the memory, nothing to update.
      param_dtype=param_dtype,
      # Activation rematerialisation per layer under autodiff: "none",
      # "full" (keep each layer's input only) or "minimal" (also keep the
      # weight-matmul outputs). Less memory, more compute, same numbers.
      remat="none",
      # Field overrides for "scratch:" models (d_model, num_layers, ...).
      overrides=ml_collections.ConfigDict(),
  ))


def get_config() -> ml_collections.ConfigDict:
  """The default: KETCHUP K=4 on the embedded numbers_en_nl task, tiny models."""
  c = ml_collections.ConfigDict()
  # Seed of parameter init, data order and rollouts.
  c.seed = 0
  # Stages to run, in order: teacher_sft, predistill, rl, eval. A finished
  # stage (DIR/stages/<stage>.json) is skipped on rerun.
  c.stages = "teacher_sft,predistill,rl,eval"

  c.task = ml_collections.ConfigDict(dict(
      # numbers_en_nl, arith (embedded); xsum, gsm8k (TFDS); europarl_en_nl,
      # jsonl (files: options.paths).
      name="numbers_en_nl",
      # Keyword options of the task builder (see ketchup_jax.data.tasks).
      options=ml_collections.ConfigDict(),
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      # "byte" (no files), "word" (trained on the train split, saved to
      # DIR/tokenizer.json), or "hf" (a local tokenizer directory in `path`).
      kind="byte",
      # hf: tokenizer directory; word: a saved vocabulary (optional).
      path="",
      # byte: padded vocabulary size; word: maximum vocabulary; 0 = default.
      vocab_size=0,
      # hf: prompts are the user turn of the tokenizer's chat template, the
      # assistant's turn opened (for instruct models).
      chat_template=False,
  ))
  # Token caps, EOS included; longer examples are truncated and counted.
  c.max_source_len = 64
  c.max_target_len = 64
  # Padded lengths a batch may take (each new shape compiles the step once);
  # empty = powers of two from 8 up to the cap.
  c.source_buckets = ()
  c.target_buckets = ()

  # The teacher and the student; they must share one vocabulary.
  c.teacher = model("scratch:tiny")
  c.student = model("scratch:tiny")
  # LoRA student (ketchup_jax.models.lora): rank-r adapters on the
  # attention and MLP kernels, trained with the base frozen, in every
  # student stage (predistill, rl; teacher_sft trains the teacher in full).
  # rank 0 = off (the whole student trains). Optimizer state and
  # checkpoints hold the adapters only; each stage starts fresh adapters on
  # the model it starts from (rl: predistill's merged export) and exports
  # the merged HF model to DIR/models/<stage>/ and the PEFT adapter
  # directory (adapter_config.json + adapter_model.safetensors) to
  # DIR/models/<stage>/adapter/.
  c.student.lora = ml_collections.ConfigDict(dict(
      # r, the adapters' inner width; 0 = no LoRA.
      rank=0,
      # The update is scaled by alpha / rank (PEFT's lora_alpha).
      alpha=16.0,
      # Kernel names: q k v o (attention), wi_0 wi_1 wo (a decoder's gated
      # MLP; a T5's wi | wi_0 wi_1, wo). Every one the model has, by default.
      targets=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
      # Storage dtype of the frozen base: "float32" or "bfloat16" (half the
      # memory; cast to student.param_dtype when the adapters are merged).
      base_dtype="float32",
  ))

  # Stage teacher_sft: cross-entropy of the teacher on the gold targets.
  c.teacher_sft = optim(steps=200, learning_rate=1e-3, batch_size=32)

  # Stage predistill: the student learns from the teacher before RL.
  c.predistill = optim(steps=200, learning_rate=1e-3, batch_size=32)
  # "seqkd" (cross-entropy on the teacher's greedy outputs), word-level
  # "kl", "rkl", "js", "tvd" on the gold targets, or "gkd" (options in
  # `gkd` below).
  c.predistill.method = "seqkd"
  # Length of the teacher's greedy outputs for seqkd.
  c.predistill.max_decode_len = 64

  # Stage rl: KETCHUP (SPEC §2-3), starting from the predistilled student.
  # The authors' recipe (SPEC §4.3), which gained most on validation in
  # issue 13's ablation (docs/experiments.md): lr 1e-5 constant, no gradient
  # clipping, greedy rollouts, the pi-weighted loss, validation every 8
  # updates keeping the best.
  c.rl = optim(steps=100, learning_rate=1e-5, batch_size=8,
               schedule="constant", max_grad_norm=0.0, eval_every=8,
               select="best")
  # Jump length K of the K-step return; 1 is LLMR.
  c.rl.k = 4
  # Several K from the same start, one run each (rl_k<K>); empty = (k,).
  c.rl.ks = ()
  # State value: "max" (Bellman optimality), "expected" (softmax-weighted)
  # or "soft" (logsumexp; then Q_t(a_t) - V_t = log p_teacher(a_t), SPEC §6).
  c.rl.value = "max"
  # Per-token reward (SPEC §6): "llmr" (Q_t(a_t) - V_{t+1}, K-step returns),
  # "reverse_kl" (log p_teacher(a_t) - log p_student(a_t), the student's
  # log-prob detached; discounted reward-to-go with `gamma`, K unused) or
  # "reverse_kl_kstep" (the experimental K-step reverse KL: that reward summed
  # over t's K-step chain positions t, n(t), n(n(t)), ... only, discounted by
  # gamma^(position - t); needs gamma > 0). Reverse-KL rewards refuse
  # unfinished="bootstrap" and baseline="teacher_expected".
  c.rl.reward = "llmr"
  # Discount of the reverse-KL returns in [0, 1]; 0 = immediate reward.
  c.rl.gamma = 0.0
  # Centre the teacher logits per position into Q-values.
  c.rl.center_logits = True
  # Rollouts without EOS: "drop" (excluded, loss scaled by the finished
  # fraction), "terminal" (last position is terminal) or "bootstrap".
  c.rl.unfinished = "drop"
  # Baseline b_t: "none", "batch_mean", "teacher_expected" (sum softmax(Q) Q)
  # or "value" (V_t of rl.value: A_t = -(regrets along t's K-step chain)).
  c.rl.baseline = "none"
  # Weight w_t: "none", "importance" (pi/mu) or "reference_compat" (pi).
  c.rl.weight = "reference_compat"
  # Advantage divisor.
  c.rl.denom = 1.0
  # Advantage clip c (authors' default 50).
  c.rl.reward_clip = 50.0
  # Entropy bonus beta.
  c.rl.entropy_coef = 0.0
  # Rollout length (new tokens) and sampling settings.
  c.rl.max_decode_len = 64
  c.rl.temperature = 0.0
  c.rl.top_k = 0
  c.rl.top_p = 1.0
  # Every N steps (0 = never), log the gradient variance, return variance and
  # bias of the run's K over `diag_minibatches` fresh rollout minibatches to
  # metrics.jsonl (stage rl_k<K>_diag; ketchup_jax/diagnostics.py).
  c.rl.diag_every = 0
  c.rl.diag_minibatches = 8

  # Validation during training (stages with eval_every > 0).
  c.validation = ml_collections.ConfigDict(dict(
      # The task's split to validate on; a task without it gets a
      # deterministic carve-out of train (removed from train).
      split="validation",
      # Validate on the first N examples (the carve-out's size).
      max_examples=512,
      # Metric that selection maximises; "" = the task's first metric.
      metric="",
  ))

  # GKD (predistill.method="gkd"; Agarwal et al. 2024, SPEC §6).
  c.gkd = ml_collections.ConfigDict(dict(
      # lambda in [0, 1]: the fraction of batches whose targets are the
      # student's own samples (the rest use the gold targets).
      lmbda=0.5,
      # JSD weight beta in [0, 1], with P = teacher, Q = student,
      # M = beta P + (1 - beta) Q: JSD = beta KL(P||M) + (1 - beta) KL(Q||M).
      # beta = 0 is forward KL(teacher || student), beta = 1 reverse
      # KL(student || teacher) (ketchup_jax.divergences.generalized_jsd_loss).
      beta=0.5,
      # Sampling temperature of the student's samples (0 = greedy).
      temperature=1.0,
      # Length (new tokens) of the student's samples.
      max_decode_len=64,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      # Split to evaluate on.
      split="test",
      # Rows per decoding batch.
      batch_size=64,
      # Evaluate on the first N examples of the split; 0 = all.
      max_examples=0,
      # Greedy decoding length.
      max_decode_len=64,
      # K values of the return-variance / bias diagnostic (plots/).
      diag_ks=(1, 2, 4, 8, 16),
      # Rollout batches of the diagnostic.
      diag_batches=4,
  ))

  # The float32 logits of the LM heads, this many target positions at a time,
  # in every loss and in the teacher's Q-values (forward and backward; the
  # same numbers, ketchup_jax/chunked.py). 0 = all positions at once: fastest
  # when B x T x V x 4 bytes fits, e.g. T5's 32k vocabulary. 32 caps the
  # logits at B x 32 x V x 4 bytes per buffer for large vocabularies (Qwen's
  # 151,936) or long targets.
  c.logits_chunk = 0

  # Device mesh. data/fsdp/tensor: sizes within one granule (a TPU slice,
  # or one host/process elsewhere), one of them may be -1 (the devices left
  # over); dcn_*: sizes across granules (data-parallel across hosts is the
  # usual choice). Each mesh axis is ici * dcn long.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  # Where the frozen teacher lives in the predistill (seqkd only) and rl
  # stages (ketchup_jax/train/teacher_slice.py). devices: 0 = on the
  # student's mesh above, sharded like the student; N > 0 = on its own mesh
  # of the last N devices, the student and `mesh` on the rest (one process
  # only, for now). data/fsdp/tensor: the teacher mesh's
  # shape, one of them may be -1 (the devices left over). With its own mesh
  # the teacher holds no memory on the student's devices, but its devices
  # idle during the student's rollout and update, and each step sends the
  # rollout there and its [B, T] Q-values back. teacher_sft and eval run on
  # `mesh`; predistill kl/rkl/js/tvd and rl.diag_every > 0 are refused.
  c.teacher_mesh = ml_collections.ConfigDict(dict(devices=0, data=1, fsdp=-1,
                                                  tensor=1))
  # Multi-process runs (jax.distributed; see ketchup_jax/distributed.py and
  # launch/). "auto": explicit settings below or $KETCHUP_COORDINATOR_ADDRESS,
  # $KETCHUP_NUM_PROCESSES, $KETCHUP_PROCESS_ID if given, else a TPU pod or a
  # SLURM job is detected, else one process. "explicit": the three must be
  # given. "cluster": JAX's own detection (TPU pods, SLURM, ...), always.
  # "never": always one process.
  c.distributed = ml_collections.ConfigDict(dict(
      initialize="auto",
      # "HOST:PORT" of process 0's coordinator service; "" = unset.
      coordinator_address="",
      # Number of processes; 0 = unset.
      num_processes=0,
      # This process's index; -1 = unset.
      process_id=-1,
  ))
  # Save a checkpoint every N micro-steps (and at the end of each stage).
  c.checkpoint_every = 100
  # Log metrics every N micro-steps.
  c.log_every = 10
  # Stop with an error after N consecutive steps whose loss or gradient is
  # not finite (each such update is skipped, optimizer state untouched).
  c.max_nonfinite_steps = 10
  # After SIGTERM/SIGINT: seconds to reach a step boundary and checkpoint
  # before exiting without saving. With several processes a signal to any of
  # them stops all at the next logging or checkpoint step (log_every).
  c.preemption_grace_s = 120.0
  return c

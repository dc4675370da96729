"""What every stage of one run shares: `Run`, built by `setup`.

`setup(config, workdir)` checks the config and every input, builds the mesh,
task, tokenizer and tokenised data, and writes nothing. `prepare_workdir`
then creates the run directory and records the config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from ketchup_jax import data as data_lib
from ketchup_jax import distributed
from ketchup_jax import fileio
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.models import lora as lora_lib
from ketchup_jax.train import inputs
from ketchup_jax.train import preemption
from ketchup_jax.train import settings
from ketchup_jax.train import sources
from ketchup_jax.train import steps
from ketchup_jax.train import teacher_slice
from ketchup_jax.train import validation
from ketchup_jax.train import writer as writer_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage of one run shares.

  `setup` builds it without `writer` and `stop`; the pipeline makes the copy
  that has them (`dataclasses.replace`) once the run directory is locked.
  """
  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  task: data_lib.Task
  tokenizer: data_lib.Tokenizer
  train: data_lib.TokenizedExamples | data_lib.LazyTokenized
  eval: data_lib.TokenizedExamples
  eval_references: list[str]
  # The validation split (None when no stage validates), its references and
  # the metric selection maximises.
  validation: data_lib.TokenizedExamples | None = None
  validation_references: list[str] = dataclasses.field(default_factory=list)
  validation_metric: str = ""
  writer: writer_lib.MetricWriter | None = None
  stop: preemption.StopRequest | None = None
  # The teacher's own mesh (config.teacher_mesh.devices > 0), else None.
  teacher_mesh: jax.sharding.Mesh | None = None

  @property
  def batch_multiple(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def batches(self, data: data_lib.TokenizedExamples, *, batch_size: int,
              **kwargs: Any) -> data_lib.BatchIterator:
    """Batches laid out for the mesh, padded to the configured buckets."""
    return data_lib.BatchIterator(
        data, batch_size=batch_size, batch_multiple=self.batch_multiple,
        source_buckets=tuple(self.cfg.source_buckets) or None,
        target_buckets=tuple(self.cfg.target_buckets) or None,
        agree_lengths=distributed.max_over_processes, **kwargs)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def batch_sharding(self) -> NamedSharding:
    return partitioning.batch_sharding(self.mesh)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def stage_done(self, stage: settings.StageId | str) -> bool:
    """Whether `stages/<stage>.json` marks it finished."""
    return os.path.exists(self.path("stages", f"{stage}.json"))

  def teacher_source(self) -> str:
    """The teacher's `init_from`: teacher_sft's output once it runs or ran."""
    if "teacher_sft" in settings.parse_stages(self.cfg.stages) or (
        self.stage_done("teacher_sft")):
      return sources.stage_source("teacher_sft")
    return self.cfg.teacher.init_from

  def student_start(self) -> str:
    """Where RL starts: predistill's output once it runs or ran."""
    if "predistill" in settings.parse_stages(self.cfg.stages) or (
        self.stage_done("predistill")):
      return sources.stage_source("predistill")
    return self.cfg.student.init_from

  def student_lora(self) -> lora_lib.LoraStudent | None:
    """`config.student.lora` (None: rank 0, the whole student trains)."""
    return lora_lib.LoraStudent.from_config(
        self.cfg.student.get("lora"), self.cfg.student.param_dtype)

  def step_models(self, student: models.LM,
                  teacher: models.LM | None, *,
                  lora: lora_lib.LoraStudent | None = None
                  ) -> steps.StepModels:
    """The static description of the models a jitted step uses."""
    return steps.StepModels(student=student.config,
                        teacher=None if teacher is None else teacher.config,
                        mesh=self.mesh,
                        logits_chunk=self.cfg.get("logits_chunk", 0),
                        lora=lora)

  def load_model(self, role: str, init_from: str,
                 model_cfg: ml_collections.ConfigDict, seed: int, *,
                 mesh: jax.sharding.Mesh | None = None) -> models.LM:
    """`sources.load_model` on `mesh` (the teacher's own), else `self.mesh`."""
    return sources.load_model(
        init_from, model_cfg, seed, role=role,
        mesh=self.mesh if mesh is None else mesh,
        tokenizer_vocab=self.tokenizer.vocab_size,
        tokenizer_eos=self.tokenizer.eos_id, models_dir=self.path("models"))


def _make_tokenizer(cfg: ml_collections.ConfigDict, task: data_lib.Task,
                    workdir: str, *, t5_ids: bool) -> data_lib.Tokenizer:
  """The configured tokenizer; an HF one must have T5's ids for T5 models."""
  kind = cfg.tokenizer.kind
  size = cfg.tokenizer.vocab_size or None
  if kind == "word" and not cfg.tokenizer.path:
    saved = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(saved):
      return data_lib.get_tokenizer("word", path=saved)
    return data_lib.get_tokenizer("word", texts=task.texts("train"),
                                  vocab_size=size)
  if kind not in ("byte", "word", "hf"):
    raise ValueError(f"config.tokenizer.kind must be 'byte', 'word' or 'hf', "
                     f"got {kind!r}")
  return data_lib.get_tokenizer(kind, path=cfg.tokenizer.path or None,
                                vocab_size=size, require_t5_ids=t5_ids)


def _prompt_format(cfg: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer,
                   prefix: str) -> Callable[[list[dict[str, str]]],
                                            list[dict[str, str]]]:
  """examples -> the same with each source as the model's prompt.

  The task's prefix, then the source; with `config.tokenizer.chat_template`
  that text is the user turn of the HF tokenizer's chat template, with the
  assistant's turn opened (`add_generation_prompt`).
  """
  if not cfg.tokenizer.get("chat_template", False):
    return lambda examples: [dict(ex, source=prefix + ex["source"])
                             for ex in examples]
  if not isinstance(tokenizer, data_lib.HFTokenizer) or not (
      tokenizer.hf_tokenizer.chat_template):
    raise ValueError(f"config.tokenizer.chat_template=True needs an HF "
                     f"tokenizer (kind 'hf') that has a chat template, got "
                     f"kind {cfg.tokenizer.kind!r}")
  return lambda examples: [
      dict(ex, source=tokenizer.chat_prompt(prefix + ex["source"]))
      for ex in examples]


def _limit(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
  return examples[:n] if n else examples


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config and builds the mesh, task, tokenizer and data.

  Writes nothing.
  """
  settings.check_config(cfg)
  inputs.check_models(cfg, workdir)
  student_devices, teacher_mesh = teacher_slice.make_teacher_mesh(cfg)
  mesh = partitioning.make_mesh(
      data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
      **{f"dcn_{a}": cfg.mesh.get(f"dcn_{a}", 1)
         for a in ("data", "fsdp", "tensor")},
      **({} if student_devices is None else {"devices": student_devices}))
  logging.info("%s", distributed.mesh_layout(mesh))
  if teacher_mesh is not None:
    logging.info("teacher's own mesh: %s", distributed.mesh_layout(
        teacher_mesh))
    teacher_slice.check_batch_sizes(cfg, teacher_mesh)
  task = data_lib.get_task(cfg.task.name, **cfg.task.options.to_dict())
  kinds = [sources.declared_kind(cfg[role]) for role in ("teacher", "student")]
  sources.check_same_kind(*kinds)
  tokenizer = _make_tokenizer(cfg, task, workdir,
                              t5_ids="decoder-only" not in kinds)
  # A decoder-only model's prompt runs on into its completion: no EOS there.
  caps = dict(tokenizer=tokenizer, max_source_len=cfg.max_source_len,
              max_target_len=cfg.max_target_len,
              source_eos="decoder-only" not in kinds)
  prompt = _prompt_format(cfg, tokenizer, task.prefix)
  train_examples = task.examples("train")
  if not train_examples:
    raise ValueError(f"task {task.name!r} has no examples in split 'train'")
  val_examples, val_metric = [], ""
  if validation.needed(cfg):
    val_metric = validation.metric_name(cfg, task.metric_names)
    val_cfg = cfg.get("validation", ml_collections.ConfigDict())
    val_split = val_cfg.get("split", "validation")
    max_val = val_cfg.get("max_examples", 512)
    if val_split in task.splits and task.examples(val_split):
      val_examples = validation.subset(task.examples(val_split), max_val)
      logging.info("validation: %d examples of split %r, metric %s",
                   len(val_examples), val_split, val_metric)
    else:  # e.g. a jsonl task with train and test files only
      train_examples, val_examples = validation.carve_out(train_examples,
                                                          max_val)
      logging.info("validation: task %r has no %r split; %d train examples "
                   "carved out (lowest source hash), metric %s", task.name,
                   val_split, len(val_examples), val_metric)
  if jax.process_count() > 1:
    # Per-host input: each process tokenises only the rows it feeds (its
    # slice of every global batch), when the batch is drawn.
    train = data_lib.LazyTokenized(prompt(train_examples), **caps)
    logging.info("data train: %d examples, each process tokenises its own "
                 "rows of every batch", len(train))
  else:
    train = data_lib.tokenize(prompt(train_examples), **caps)
    logging.info("data train: %s", train.stats)
  eval_examples = _limit(task.examples(cfg.eval.split), cfg.eval.max_examples)
  if not eval_examples:
    raise ValueError(f"task {task.name!r} has no examples in split "
                     f"{cfg.eval.split!r}")
  # Every process decodes whole eval batches (eval output is gathered).
  evaluation = data_lib.tokenize(prompt(eval_examples), **caps)
  logging.info("data %s: %s", cfg.eval.split, evaluation.stats)
  val_data = (data_lib.tokenize(prompt(val_examples), **caps) if val_examples
              else None)
  for stage in settings.TRAINING_STAGES:
    if cfg[stage].batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
      raise ValueError(
          f"config.{stage}.batch_size={cfg[stage].batch_size} must be a "
          f"multiple of the data shards (mesh data x fsdp = "
          f"{mesh.shape['data'] * mesh.shape['fsdp']})")
  sources.check_same_tokenizer(tokenizer, cfg.tokenizer.path,
                               cfg.teacher.init_from, cfg.student.init_from)
  return Run(cfg=cfg, workdir=workdir, mesh=mesh, task=task,
             tokenizer=tokenizer, train=train, eval=evaluation,
             eval_references=[ex["target"] for ex in eval_examples],
             validation=val_data,
             validation_references=[ex["target"] for ex in val_examples],
             validation_metric=val_metric, teacher_mesh=teacher_mesh)


def prepare_workdir(run: Run) -> None:
  """Creates DIR and records the config; refuses a DIR that is a file."""
  if os.path.exists(run.workdir) and not os.path.isdir(run.workdir):
    raise ValueError(f"--workdir {run.workdir!r} exists and is not a directory")
  if not run.is_main:
    distributed.barrier("workdir ready")
    return
  for sub in ("stages", "models", "checkpoints"):
    os.makedirs(run.path(sub), exist_ok=True)
  config_path = run.path("config.json")
  new = run.cfg.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      if f.read() != new:
        logging.warning("%s differs from this run's config; finished stages "
                        "are kept and the file is updated", config_path)
  fileio.atomic_write(config_path, new)
  if isinstance(run.tokenizer, data_lib.WordTokenizer) and not (
      run.cfg.tokenizer.path):
    saved = run.path("tokenizer.json")
    if not os.path.exists(saved):
      run.tokenizer.save(saved)
  distributed.barrier("workdir ready")

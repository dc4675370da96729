"""The paper configs end to end, offline: two RL steps each.

Each of configs/xsum_k4.py, configs/europarl_en_nl_k4.py and
configs/gsm8k_k8.py is loaded as shipped and shrunk here (no test-only config
files): random tiny HF T5 checkpoints stand in for FLAN-T5-XL (teacher, v1.1
gated-GELU) and T5-base (student, v1.0 ReLU tied), a tiny Unigram tokenizer
with T5's ids for the SentencePiece one, `tfds.testing.mock_data` for the TFDS
downloads (XSum, GSM8K) and a TSV in a temporary folder for Europarl. What the
configs choose is kept: the task, prompt prefix, stages, K, pre-distillation
method, RL loss settings, and the bfloat16 compute with float32 master weights
(the same cost on CPU as float32 here: compiling dominates).

The random checkpoints get an EOS bonus (see `paper_fixtures.write_t5`):
without it a random student almost never ends a rollout, and the configs drop
unfinished rollouts from the RL loss, so the two RL steps would be empty. The
student's is large: its rollouts are greedy (the authors' recipe), so EOS
must be its argmax somewhere within the 12 decoded tokens.

The three runs share the checkpoints, the tokenizer and the session's persistent
compilation cache, so only the first pays for most compiles.
"""

import json
import math
import os
import pathlib
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import europarl_en_nl_k4
from configs import gsm8k_k8
from configs import xsum_k4
from ketchup_jax import models
from ketchup_jax.data import tasks
from ketchup_jax.train import settings
from ketchup_jax.train import sources
import paper_fixtures
from test_pipeline import _run_on_one_device

# name -> (config module, K it sets, metric names of its task, needs TFDS).
CONFIGS = {
    "xsum_k4": (xsum_k4, 4, ("rouge1", "rouge2", "rougeL"), True),
    "europarl_en_nl_k4": (europarl_en_nl_k4, 4, ("bleu", "chrf"), False),
    "gsm8k_k8": (gsm8k_k8, 8, ("gsm8k_accuracy",), True),
}
DECODE_LEN = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Tokenizer and teacher / student checkpoints shared by the three runs."""
  root = tmp_path_factory.mktemp("paper_assets")
  return {
      "tokenizer": paper_fixtures.write_tokenizer(root / "tokenizer"),
      # FLAN-T5-like: T5 v1.1, gated-GELU, separate lm_head.
      "teacher": paper_fixtures.write_t5(root / "teacher", v1_1=True,
                                         d_model=32, d_ff=64, num_layers=1,
                                         eos_bonus=6.0, seed=0),
      # T5-like: v1.0, ReLU, tied and scaled output; smaller.
      "student": paper_fixtures.write_t5(root / "student", v1_1=False,
                                         d_model=24, d_ff=48, num_layers=1,
                                         eos_bonus=24.0, seed=1),
      "europarl": paper_fixtures.write_europarl_tsv(root / "europarl"),
      "tfds_dir": str(root / "tfds"),
  }


def shrink(name, cfg, assets):
  """Points the config at the tiny stand-ins and shrinks every size."""
  cfg.teacher.init_from = assets["teacher"]
  cfg.student.init_from = assets["student"]
  cfg.tokenizer.path = assets["tokenizer"]
  if name == "europarl_en_nl_k4":
    cfg.task.options.paths = assets["europarl"]
  else:
    cfg.task.options.data_dir = assets["tfds_dir"]
  cfg.max_source_len = 32
  cfg.max_target_len = 16
  # One padded shape per stage: one compile each.
  cfg.source_buckets = (32,)
  cfg.target_buckets = (16,)
  cfg.predistill.steps = 1
  cfg.predistill.warmup_steps = 0
  cfg.predistill.batch_size = 4
  cfg.predistill.max_decode_len = DECODE_LEN
  cfg.rl.steps = 2
  cfg.rl.batch_size = 4
  cfg.rl.max_decode_len = DECODE_LEN
  cfg.eval.batch_size = 8
  cfg.eval.max_examples = 8
  cfg.eval.max_decode_len = DECODE_LEN
  cfg.eval.diag_batches = 1
  cfg.validation.max_examples = 8
  cfg.checkpoint_every = 1
  cfg.log_every = 1
  cfg.mesh.data = 1
  cfg.mesh.fsdp = 1
  cfg.mesh.tensor = 1
  return cfg


@pytest.fixture(scope="module", params=list(CONFIGS))
def paper_run(request, assets, tmp_path_factory):
  name = request.param
  module, k, metric_names, needs_tfds = CONFIGS[name]
  shipped = module.get_config()
  cfg = shrink(name, module.get_config(), assets)
  workdir = str(tmp_path_factory.mktemp(name))
  start = time.perf_counter()
  if needs_tfds:
    with paper_fixtures.mock_tfds() as reads:
      results = _run_on_one_device(cfg, workdir)
    # The task read the mocked TFDS splits, nothing else.
    assert reads and {dataset for dataset, _ in reads} == {shipped.task.name}
  else:
    results = _run_on_one_device(cfg, workdir)
  seconds = time.perf_counter() - start
  print(f"\n{name}: pipeline.run took {seconds:.1f} s")
  return dict(name=name, k=k, metric_names=metric_names, shipped=shipped,
              cfg=cfg, workdir=pathlib.Path(workdir), results=results,
              seconds=seconds)


def test_shipped_configs_run_the_authors_recipe():
  """SPEC §4.3: what jiabinfan/KETCHUP's RL code runs, in every paper config."""
  for name, (module, k, _, _) in CONFIGS.items():
    c = module.get_config()
    assert c.predistill.method == "kl", name
    rl = c.rl
    assert (rl.temperature, rl.weight, rl.baseline) == (
        0.0, "reference_compat", "none"), name
    assert (rl.reward_clip, rl.denom, rl.entropy_coef) == (50.0, 1.0, 0.0)
    assert (rl.learning_rate, rl.schedule, rl.warmup_steps,
            rl.weight_decay, rl.max_grad_norm) == (1e-5, "constant", 0, 0.0,
                                                   0.0), name
    assert rl.batch_size * rl.grad_accum == 8, name
    assert (rl.eval_every, rl.select) == (8, "best"), name
    assert c.validation.split == "validation", name
    assert settings.rl_ks(c) == (k,), name
    settings.check_config(c)


def test_shipped_config_names_its_k_and_task(paper_run):
  shipped = paper_run["shipped"]
  for role in ("teacher", "student"):
    assert paper_run["cfg"][role].dtype == shipped[role].dtype == "bfloat16"
  assert settings.rl_ks(shipped) == (paper_run["k"],)
  assert shipped.stages == "predistill,rl,eval"
  assert shipped.tokenizer.kind == "hf"
  # The stand-in data really is the config's task, with its metrics.
  task = tasks.get_task(shipped.task.name,
                        **paper_run["cfg"].task.options.to_dict())
  assert task.metric_names == paper_run["metric_names"]


def test_results_have_predistilled_and_rl_rows_with_task_metrics(paper_run):
  workdir, k = paper_run["workdir"], paper_run["k"]
  results = paper_run["results"]
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["task"] == paper_run["shipped"].task.name
  assert on_disk["num_examples"] == 8
  assert tuple(on_disk["metric_names"]) == paper_run["metric_names"]
  # The prompted teacher (a directory, not a stage), the SeqKD student, and
  # KETCHUP with the config's K.
  assert list(on_disk["models"]) == ["teacher", "student (kl)",
                                     f"KETCHUP (K={k})"]
  for label, row in on_disk["models"].items():
    assert set(row["metrics"]) == set(paper_run["metric_names"]), label
    for value in row["metrics"].values():
      assert math.isfinite(value) and 0.0 <= value <= 100.0, (label, value)
  assert on_disk["models"]["student (kl)"]["source"] == "stage:predistill"
  # RL validated (eval_every 8 > 2 steps: at the start and the last update)
  # and exported its best update, never the start.
  selection = on_disk["models"][f"KETCHUP (K={k})"]["selection"]
  assert selection["select"] == "best" and selection["eval_every"] == 8
  assert selection["selected_step"] in (1, 2)
  assert on_disk["models"][f"KETCHUP (K={k})"]["source"] == f"stage:rl_k{k}"
  # Two RL steps at lr 1e-5 still move the parameters.
  checksums = [row["checksum"] for row in on_disk["models"].values()]
  assert len(set(checksums)) == 3
  predictions = workdir / "predictions" / f"rl_k{k}.jsonl"
  assert len(predictions.read_text().splitlines()) == 8


def test_metrics_log_two_rl_steps_with_the_configs_k(paper_run):
  workdir, k = paper_run["workdir"], paper_run["k"]
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["stage"] for r in records} == {"predistill", f"rl_k{k}",
                                          f"rl_k{k}_val"}
  assert [r["step"] for r in records if r["stage"] == f"rl_k{k}_val"] == [
      0, 2]
  rl = [r for r in records if r["stage"] == f"rl_k{k}"]
  assert [r["step"] for r in rl] == [1, 2]
  for r in rl:
    assert math.isfinite(r["loss"]), r
    assert 0.0 <= r["finished_fraction"] <= 1.0
  # Some rollouts ended (the configs drop unfinished ones from the loss), so
  # the RL loss really had terms and a gradient.
  assert max(r["finished_fraction"] for r in rl) > 0
  assert max(r["grad_norm"] for r in rl) > 0
  # The stages that ran (and only these) are the config's.
  assert sorted(os.listdir(workdir / "stages")) == [
      "predistill.json", f"rl_k{k}.json"]
  assert sorted(os.listdir(workdir / "models")) == ["predistill", f"rl_k{k}"]
  written = json.loads((workdir / "config.json").read_text())
  assert written["rl"]["k"] == k and written["rl"]["steps"] == 2


def test_exported_rl_student_loads_in_torch_with_the_same_logits(paper_run):
  path = str(paper_run["workdir"] / "models" / f"rl_k{paper_run['k']}")
  ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  assert ref.config.feed_forward_proj == "relu"
  assert ref.config.vocab_size == paper_fixtures.VOCAB_SIZE
  lm = models.load(path, dtype=jnp.float32)
  assert sources.params_checksum(lm.params) == (
      paper_run["results"]["models"][f"KETCHUP (K={paper_run['k']})"]
      ["checksum"])
  rng = np.random.default_rng(0)
  ids = rng.integers(3, paper_fixtures.VOCAB_SIZE, (2, 10))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  dec = rng.integers(3, paper_fixtures.VOCAB_SIZE, (2, 7))
  dec[:, 0] = 0
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               decoder_input_ids=torch.tensor(dec)).logits.numpy()
  got = np.asarray(lm.logits(ids, mask, dec))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

"""The teacher on its own devices: same numbers as the shared mesh, bad configs.

Runs on the 8 fake CPU devices of conftest: 4 for the student, 4 for the
teacher.
"""

import dataclasses
import functools
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import smoke
from ketchup_jax import models
from ketchup_jax import partitioning
from ketchup_jax.train import context
from ketchup_jax.train import pipeline
from ketchup_jax.train import rollouts
from ketchup_jax.train import state as state_lib
from ketchup_jax.train import steps
from ketchup_jax.train import teacher_slice

B, S, T, V = 8, 8, 5, 64


def _tiny(seed, mesh):
  return models.init("tiny", jax.random.PRNGKey(seed), mesh=mesh,
                     num_layers=1, num_decoder_layers=1, vocab_size=V)


def _state_shardings(params, tx):
  return jax.tree.map(lambda x: x.sharding, jax.eval_shape(
      functools.partial(state_lib.init_state, tx=tx, seed=0), params))


def test_own_slice_rl_step_equals_the_same_mesh_step(monkeypatch):
  student_devices, teacher_devices = teacher_slice.split_devices(4)
  assert student_devices == jax.devices()[:4]
  student_mesh = partitioning.make_mesh(data=1, fsdp=4,
                                        devices=student_devices)
  teacher_mesh = partitioning.make_mesh(data=1, fsdp=4,
                                        devices=teacher_devices)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(2, V, (B, S)).astype(np.int32),
           "attention_mask": np.ones((B, S), np.int32),
           "example_mask": np.array([1] * 7 + [0], np.int32)}
  batch["attention_mask"][2, 5:] = 0
  # Bootstrap + teacher_expected: every array of teacher_scores crosses.
  rl = rollouts.RLConfig(k=2, max_decode_len=T, unfinished="bootstrap",
                      baseline="teacher_expected")
  optim = state_lib.OptimConfig(steps=2, learning_rate=1e-3)
  tx = state_lib.make_optimizer(optim)

  def run(mesh, t_mesh, split):
    student, teacher = _tiny(1, mesh), _tiny(0, t_mesh)
    mods = steps.StepModels(student=student.config, teacher=teacher.config,
                        mesh=mesh)
    state = state_lib.init_state(student.params, tx, 0)
    batch_sharding = partitioning.batch_sharding(mesh)
    on_mesh = jax.device_put(batch, batch_sharding)
    if split:
      step = teacher_slice.RLStep(models=mods, teacher_mesh=t_mesh,
                                  optim=optim, rl=rl).compile(
                                      _state_shardings(state.params, tx),
                                      batch_sharding,
                                      jax.sharding.NamedSharding(
                                          mesh, jax.sharding.PartitionSpec()))
    else:
      step = jax.jit(functools.partial(rollouts.rl_step, models=mods,
                                       optim=optim, rl=rl))
    history = []
    for _ in range(2):
      state, metrics = step(state, teacher.params, on_mesh)
      history.append(jax.device_get(metrics))
    return state, history, teacher

  # The same-mesh reference on the student's 4 devices: the teacher is
  # sharded the same way (fsdp=4) on either mesh, so the two steps do the
  # same float operations and may differ only by XLA's fusion choices. (On
  # all 8 devices, data=2 x fsdp=4, the loss differs by ~4e-5 relative:
  # another reduction order.)
  want_state, want, _ = run(student_mesh, student_mesh, split=False)
  crossed = []
  put = jax.device_put

  def recording_put(x, sharding=None, **kw):
    fields = (dataclasses.asdict(x) if isinstance(x, rollouts.TeacherScores)
              else x)
    if isinstance(fields, dict) and ("actions" in fields or
                                     "q_taken" in fields):
      crossed.append((sharding.mesh, {k: v.shape for k, v in fields.items()
                                      if v is not None}))
    return put(x, sharding, **kw)

  monkeypatch.setattr(jax, "device_put", recording_put)
  got_state, got, teacher = run(student_mesh, teacher_mesh, split=True)
  monkeypatch.undo()

  # Only sources [B, S] and [B, T] / [B] arrays crossed, never [B, T, V].
  crossings = crossed
  assert crossings[0] == (teacher_mesh, {
      "input_ids": (B, S), "attention_mask": (B, S), "actions": (B, T),
      "mask": (B, T), "finished": (B,)})
  assert crossings[1] == (student_mesh, {
      "q_taken": (B, T), "values": (B, T), "bootstrap_value": (B,),
      "teacher_values": (B, T)})
  assert len(crossings) == 4  # two steps, there and back
  # The teacher stayed on its devices, the student on the others.
  for x in jax.tree.leaves(teacher.params):
    assert x.sharding.device_set == set(teacher_devices)
  for x in jax.tree.leaves(got_state.params):
    assert x.sharding.device_set == set(student_devices)

  for w, g in zip(want, got):
    assert float(w["loss"]) != 0.0
    for key in ("loss", "return_mean", "return_var", "entropy", "grad_norm",
                "tokens", "loss_tokens", "finished_fraction"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-6,
                                 err_msg=key)
  assert int(got_state.step) == 2
  np.testing.assert_array_equal(got_state.rng, want_state.rng)
  for w, g in zip(jax.tree.leaves(want_state.params),
                  jax.tree.leaves(got_state.params)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def _config(**teacher_mesh):
  cfg = smoke.get_config()
  cfg.teacher_mesh.update(teacher_mesh)
  return cfg


@pytest.mark.parametrize("fields, message", [
    (dict(devices=9), r"teacher_mesh.devices=9 must be smaller than the "
     r"device count 8: the student needs at least one device"),
    (dict(devices=8), r"teacher_mesh.devices=8 must be smaller"),
    (dict(devices=-2), r"teacher_mesh.devices must be an int >= 0"),
    (dict(devices=4, data=3), r"the sizes other than -1 multiply to 3, "
     r"which must divide teacher_mesh.devices=4"),
    (dict(devices=4, data=2, fsdp=1), r"data x fsdp x tensor = 2 x 1 x 1 "
     r"must multiply to teacher_mesh.devices=4"),
    (dict(devices=4, data=-1, fsdp=-1), r"at most one of data/fsdp/tensor"),
    (dict(devices=4, tensor=0), r"teacher_mesh.tensor must be an int >= 1 "
     r"or -1"),
])
def test_bad_teacher_mesh_is_one_clear_error(fields, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    context.setup(_config(**fields), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_bad_batch_and_stage_choices_are_refused(tmp_path):
  cfg = _config(devices=4)
  cfg.rl.batch_size = 6  # student mesh 4 x ... : 6 rows do not split
  with pytest.raises(ValueError, match=r"config.rl.batch_size=6"):
    context.setup(cfg, str(tmp_path))
  cfg = _config(devices=4)  # teacher: 4 row shards; student: 2
  cfg.mesh.data, cfg.mesh.tensor = 2, 2
  cfg.rl.batch_size = 6
  with pytest.raises(ValueError, match=r"config.rl.batch_size=6 must be a "
                     r"multiple of the teacher mesh's data shards "
                     r"\(teacher_mesh data x fsdp = 4\)"):
    context.setup(cfg, str(tmp_path))
  cfg = _config(devices=4)
  cfg.predistill.method = "kl"
  with pytest.raises(ValueError, match=r"config.predistill.method=.kl. .*"
                     r"teacher_mesh.devices=4"):
    context.setup(cfg, str(tmp_path))
  cfg = _config(devices=4)
  cfg.rl.diag_every = 2
  with pytest.raises(ValueError, match=r"config.rl.diag_every=2 .*"
                     r"teacher_mesh.devices=4"):
    context.setup(cfg, str(tmp_path))


def test_split_devices_takes_whole_processes():
  class Dev:
    def __init__(self, i, process):
      self.id, self.process_index = i, process
  devices = [Dev(i, i // 4) for i in range(8)]  # 2 processes x 4
  student, teacher = teacher_slice.split_devices(4, devices)
  assert [d.id for d in teacher] == [4, 5, 6, 7]
  assert {d.process_index for d in student} == {0}
  with pytest.raises(ValueError, match=r"teacher_mesh.devices=2 must be a "
                     r"multiple of the 4 devices of one process \(2 "
                     r"processes\): the teacher takes whole processes"):
    teacher_slice.split_devices(2, devices)


def test_pipeline_predistill_and_rl_with_the_teacher_on_its_own_devices(
    tmp_path):
  cfg = _config(devices=4)
  cfg.stages = "predistill,rl"
  cfg.mesh.data = -1  # the 4 student devices
  cfg.predistill.steps = 1
  cfg.rl.steps = 2
  # Validation and best selection work with the teacher on its own devices.
  cfg.rl.eval_every = 1
  cfg.rl.select = "best"
  cfg.validation.max_examples = 16
  workdir = tmp_path / "run"
  pipeline.run(cfg, str(workdir))
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  by_stage = {}
  for r in records:
    by_stage.setdefault(r["stage"], []).append(r)
  assert [r["step"] for r in by_stage["rl_k2"]] == [1, 2]
  assert [r["step"] for r in by_stage["predistill"]] == [1]
  assert [r["step"] for r in by_stage["rl_k2_val"]] == [0, 1, 2]
  assert json.loads((workdir / "stages" / "rl_k2.json").read_text())[
      "selected_step"] in (1, 2)
  for r in by_stage["rl_k2"] + by_stage["predistill"]:
    assert np.isfinite(r["loss"]) and r["skipped"] == 0.0
  assert 0.0 <= by_stage["predistill"][0]["teacher_finished"] <= 1.0
  for stage in ("predistill", "rl_k2"):
    assert (workdir / "stages" / f"{stage}.json").exists()
    assert (workdir / "models" / stage / "model.safetensors").exists()


def test_memory_of_the_own_slice_layout_and_readme_table(capsys):
  from ketchup_jax import memory  # pylint: disable=g-import-not-at-top
  from ketchup_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  teacher, student = (config_lib.get_config(n) for n in ("xl", "t5-large"))
  kw = dict(global_batch=16, source_len=512, target_len=128, remat="none")
  split = memory.own_slice_bytes(teacher, student, student_devices=4,
                                 teacher_devices=4, **kw)
  shared = memory.rl_step_bytes(teacher, student, devices=8, **kw)
  # Each side holds only its own model, over half the devices.
  assert "teacher params" not in split["student"]
  assert split["teacher"]["teacher params"] == pytest.approx(
      memory.param_count(teacher) * 2 / 4, rel=1e-3)
  assert split["student"]["student params+grads+adam"] == pytest.approx(
      2 * shared["student params+grads+adam"], rel=1e-3)
  assert split["teacher"]["activations"] == memory.teacher_forward_bytes(
      teacher, batch=4, source_len=512, target_len=128)
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  assert memory.slice_table() in readme
  assert memory.main(["--own_slice"]) == 0
  assert memory.slice_table() in capsys.readouterr().out

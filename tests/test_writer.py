"""metrics.jsonl after a resume: each (stage, step) once."""
import json

from ketchup_jax.train import writer as writer_lib


def test_rewind_drops_the_steps_being_redone_and_cut_lines(tmp_path):
  w = writer_lib.MetricWriter(str(tmp_path), enabled=True)
  for stage, step in [("predistill", 1), ("predistill", 2), ("rl_k2", 1),
                      ("rl_k2_diag", 1), ("rl_k2", 2), ("rl_k2_diag", 2),
                      ("rl_k2", 3), ("rl_k4", 3)]:
    w.write(stage, step, {"loss": float(step)})
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"stage": "rl_k2", "st')  # a line a kill cut short
  assert w.rewind("rl_k2", 1) == 4
  kept = [(r["stage"], r["step"]) for r in
          map(json.loads, path.read_text().splitlines())]
  assert kept == [("predistill", 1), ("predistill", 2), ("rl_k2", 1),
                  ("rl_k2_diag", 1), ("rl_k4", 3)]
  assert w.rewind("rl_k2", 1) == 0  # nothing more to drop
  w.write("rl_k2", 2, {"loss": 0.5})
  assert json.loads(path.read_text().splitlines()[-1])["step"] == 2
  w.close()
  # Processes other than 0 neither read nor write.
  other = writer_lib.MetricWriter(str(tmp_path), enabled=False)
  assert other.rewind("predistill", 0) == 0
  assert len(path.read_text().splitlines()) == 6

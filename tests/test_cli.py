"""The command-line layer (`ketchup_jax.cli`) that every command shares."""

import pytest

# All four commands in one process: each has its own flags, so the two
# `--workdir` flags (and the two `--config`) do not collide.
from ketchup_jax import diagnostics  # pylint: disable=unused-import
from ketchup_jax import main  # pylint: disable=unused-import
from ketchup_jax import memory
from ketchup_jax import sweep  # pylint: disable=unused-import


def test_help_lists_the_commands_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as e:
    memory.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m ketchup_jax.memory")
  assert "--logits_chunk" in out and "--[no]own_slice" in out
  assert "--workdir" not in out  # another command's flag


def test_bad_flags_are_one_error_line_and_status_2(capsys):
  for argv, message in [
      (["--batch=abc"], "error: flag --batch=abc: invalid literal"),
      (["--bogus=1"], "error: Unknown command line flag 'bogus'"),
      (["--batch=16", "extra"], "error: unexpected arguments ['extra']"),
  ]:
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_second_call_starts_from_the_defaults(capsys):
  assert memory.main(["--batch=12"]) == 2  # not a multiple of 16 devices
  capsys.readouterr()
  assert memory.main([]) == 0  # --batch back at its default, 16
  assert "global batch of 16 rows" in capsys.readouterr().out

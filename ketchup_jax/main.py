"""Command line: `python -m ketchup_jax.main --config=configs/xsum_k4.py --workdir=DIR`.

Config fields can be overridden on the command line, e.g. `--config.rl.k=8`.
A bad configuration or input prints one `error:` line and exits with status 2.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ketchup_jax.train import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax (one line per file written) from the log."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or "/orbax/" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl's parser, with an unknown `--config.<field>` as one error line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value, e.g. --config.rl.k=abc
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # e.g. --config.rl.kk=3
    field = str(e.args[0] if e.args else e).strip("'\"")
    print(f"error: unknown config field {field!r}; the fields are in "
          f"configs/default.py", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

"""Command line: `python -m ketchup_jax.main --config=configs/xsum_k4.py --workdir=DIR`.

Config fields can be overridden on the command line, e.g. `--config.rl.k=8`.
A bad configuration or input prints one `error:` line and exits with status 2.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ketchup_jax import cli
from ketchup_jax.train import pipeline

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               flag_values=FLAGS)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).",
    flag_values=FLAGS, lock_config=True)

parse_flags = cli.app_flags_parser(
    FLAGS, prog="python -m ketchup_jax.main", doc=__doc__,
    required=("config", "workdir"),
    fields_hint="the fields are in configs/default.py")


def main(argv):
  del argv  # `parse_flags` refuses positional arguments
  cli.quiet_orbax()
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(cli.error(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""The command-line layer that every `python -m ketchup_jax.<command>` shares.

Each command (`main`, `sweep`, `diagnostics`, `memory`) defines its absl flags
on its own `flags.FlagValues`, so that importing several commands in one
process never defines `--workdir` twice, and parses them with `parse`:

* a bad value, an unknown flag, a missing required flag, a positional
  argument or an unknown `--config.<field>` is a `FlagError`;
* the command reports a `FlagError`, or any bad input it finds itself, with
  `error`: one `error: <message>` line on stderr and exit status 2;
* `--help` (`-h`, `--helpshort`, `--helpfull`) prints the command's
  documentation and flags and exits 0.

`main` and `sweep` run under `absl.app` (absl logging, and its flags such as
`--verbosity` and `--logtostderr`): `app_flags_parser` is their `flags_parser`.
`diagnostics.main(argv)` and `memory.main(argv)` call `parse` directly and
return the exit status.
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging

# The exit status of a bad command line, configuration or input.
BAD_INPUT = 2

_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


class FlagError(ValueError):
  """A bad command line; the message names the flag and the right form."""


class QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO chatter (one line per file written) from the log."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or "/orbax/" not in record.pathname)


def quiet_orbax() -> None:
  """Installs `QuietOrbax` on the absl logger."""
  logging.get_absl_logger().addFilter(QuietOrbax())


def error(message: object) -> int:
  """Prints `error: <message>` to stderr; returns the exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  return BAD_INPUT


def parse(flag_values: flags.FlagValues, args: Sequence[str], *, prog: str,
          doc: str, required: Sequence[str] = (),
          fields_hint: str = "") -> None:
  """Parses `args` (the command line after the program name) into flags.

  Every flag not in `args` is reset to its default first, so a command can
  be called more than once in one process.

  Args:
    flag_values: the command's own flags.
    args: e.g. `["--workdir=DIR", "--ks", "1,2"]`.
    prog: how the command is run, e.g. "python -m ketchup_jax.memory".
    doc: printed above the flags by `--help` (the module docstring).
    required: names of flags that must be given.
    fields_hint: for a command with a `--config` flag, where its fields are
      defined, e.g. "the fields are in configs/default.py": the error of an
      unknown `--config.<field>` ends with it.

  Raises:
    FlagError: as listed in the module docstring.
    SystemExit(0): after printing the help, for `--help`.
  """
  args = list(args)
  _exit_on_help(flag_values, args, prog=prog, doc=doc)
  flag_values.unparse_flags()
  try:
    rest = flag_values([prog, *args])
  except flags.Error as e:  # a bad value or an unknown flag
    raise FlagError(str(e)) from None
  except (AttributeError, KeyError) as e:  # e.g. --config.rl.kk=3
    field = str(e.args[0] if e.args else e).strip("'\"")
    hint = f"; {fields_hint}" if fields_hint else ""
    raise FlagError(f"unknown config field {field!r}{hint}") from None
  if rest[1:]:
    raise FlagError(f"unexpected arguments {rest[1:]}; {prog} takes only "
                    f"--flag=value arguments (see --help)")
  missing = [f"--{name}" for name in required
             if flag_values[name].value is None]
  if missing:
    raise FlagError(f"{' and '.join(missing)} must be given, e.g. "
                    f"{' '.join(m + '=...' for m in missing)} (see --help)")


def _exit_on_help(flag_values: flags.FlagValues, args: list[str], *,
                  prog: str, doc: str) -> None:
  """For `--help` among the options: prints `help_text` and exits 0."""
  options = args[:args.index("--")] if "--" in args else args
  if any(a in _HELP for a in options):
    print(help_text(flag_values, prog=prog, doc=doc))
    sys.exit(0)


def help_text(flag_values: flags.FlagValues, *, prog: str, doc: str) -> str:
  """The text of `--help`: usage, the command's documentation, its flags."""
  listing = flag_values.get_help(include_special_flags=False)
  # get_help groups the flags under their module's name: drop those headers.
  lines = [line for line in listing.splitlines() if line.startswith(" ")]
  return "\n".join([f"usage: {prog} [--flag=value ...]", "",
                    doc.strip(), "", "flags:", *lines])


def app_flags_parser(flag_values: flags.FlagValues, *, prog: str, doc: str,
                     required: Sequence[str] = (), fields_hint: str = ""
                     ) -> Callable[[list[str]], list[str]]:
  """The `flags_parser` of `app.run` for a command's own `flag_values`.

  absl's global flags (its logging flags, `--verbosity`, `--logtostderr`, ...)
  are accepted too; a `FlagError` is one error line and exit status 2. The
  arguments are those of `parse`.

  Returns:
    A function of the full `sys.argv` that parses it and returns `argv[:1]`.
  """

  def parser(argv: list[str]) -> list[str]:
    _exit_on_help(flag_values, argv[1:], prog=prog, doc=doc)  # ours only
    # The same Flag objects as absl's FLAGS: one parse sets both.
    flag_values.append_flag_values(flags.FLAGS)
    try:
      parse(flag_values, argv[1:], prog=prog, doc=doc, required=required,
            fields_hint=fields_hint)
    except FlagError as e:
      sys.exit(error(e))
    flags.FLAGS.mark_as_parsed()
    return argv[:1]

  return parser

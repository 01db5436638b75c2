"""``python -m jdfp.bench <subcommand>``: see jdfp/bench/__init__.py for the subcommand registry."""

from __future__ import annotations

import argparse
import importlib
import sys

from jdfp.bench import SUBCOMMANDS


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jdfp.bench", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
  for name, (module, help_) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_)
    p.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(p)
  args = parser.parse_args(argv)
  return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
  sys.exit(main())

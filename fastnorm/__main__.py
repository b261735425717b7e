"""python -m fastnorm info | bench | demo"""
import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and run(args)
COMMANDS = {
    "info": ("fastnorm._info", "versions, backends, SIMD clone, threads"),
    "bench": ("fastnorm._bench", "benchmark every variant against the peers and the floor"),
    "demo": ("fastnorm.demo", "the batch-norm experiment on scikit-learn's digits"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=modname)
        importlib.import_module(modname).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())

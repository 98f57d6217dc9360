#!/usr/bin/env python3
"""Synthesise the demo corpus: the command line of cifhkd.corpus (--help lists the options)."""
import sys

try:
    from cifhkd.corpus import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    sys.exit(main())

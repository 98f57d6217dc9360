#!/usr/bin/env python3
"""Decode a split with a trained CIF-HKD model: the command line of cifhkd.decode (--help lists the options)."""
import sys

try:
    from cifhkd.decode import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    sys.exit(main() and 0)   # main returns the scores

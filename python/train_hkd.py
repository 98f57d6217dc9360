#!/usr/bin/env python3
"""Train the CIF-HKD recognizer: the command line of cifhkd.train (--help lists the options)."""
import sys

try:
    from cifhkd.train import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    main()

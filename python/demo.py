#!/usr/bin/env python3
"""The CPU demo (make demo): the command line of cifhkd.demo (--help lists the options)."""
import sys

try:
    from cifhkd.demo import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Draw one utterance's CIF alignment: the command line of cifhkd.plot_alignment (--help lists the options)."""
import sys

try:
    from cifhkd.plot_alignment import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build the ASR vocabulary and cache the teacher's token states: the command line of cifhkd.teacher_cache (--help lists the options)."""
import sys

try:
    from cifhkd.teacher_cache import main
except ModuleNotFoundError as e:        # an install older than cifhkd maps only cifops
    if e.name != "cifhkd":
        raise
    sys.exit("cifhkd is not installed: run `pip install --no-build-isolation -e '.[train]'` "
             "in the repository (or `make build`)")

if __name__ == "__main__":
    sys.exit(main())

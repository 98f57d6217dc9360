#!/usr/bin/env python3
"""The CPU demo (make demo): the command line of cifhkd.demo (--help lists the options)."""

from cifhkd.demo import main

if __name__ == "__main__":
    main()

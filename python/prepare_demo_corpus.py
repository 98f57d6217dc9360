#!/usr/bin/env python3
"""Synthesise the demo corpus: the command line of cifhkd.corpus (--help lists the options)."""

from cifhkd.corpus import main

if __name__ == "__main__":
    main()

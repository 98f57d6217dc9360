#!/usr/bin/env python3
"""Synthesise the demo corpus: the command line of cifhkd.corpus (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("corpus")

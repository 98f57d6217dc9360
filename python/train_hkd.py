#!/usr/bin/env python3
"""Train the CIF-HKD recognizer: the command line of cifhkd.train (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("train")

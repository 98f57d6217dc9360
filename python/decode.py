#!/usr/bin/env python3
"""Decode a split with a trained CIF-HKD model: the command line of cifhkd.decode (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("decode")

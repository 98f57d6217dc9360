#!/usr/bin/env python3
"""The CPU demo (make demo): the command line of cifhkd.demo (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("demo")

#!/usr/bin/env python3
"""Draw one utterance's CIF alignment: the command line of cifhkd.plot_alignment (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("plot_alignment")

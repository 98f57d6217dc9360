#!/usr/bin/env python3
"""Draw one utterance's CIF alignment: the command line of cifhkd.plot_alignment (--help lists the options)."""

from cifhkd.plot_alignment import main

if __name__ == "__main__":
    main()

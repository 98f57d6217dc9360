#!/usr/bin/env python3
"""Train the CIF-HKD recognizer: the command line of cifhkd.train (--help lists the options)."""

from cifhkd.train import main

if __name__ == "__main__":
    main()

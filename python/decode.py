#!/usr/bin/env python3
"""Decode a split with a trained CIF-HKD model: the command line of cifhkd.decode (--help lists the options)."""

from cifhkd.decode import main

if __name__ == "__main__":
    main()

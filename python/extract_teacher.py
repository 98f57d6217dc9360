#!/usr/bin/env python3
"""Build the ASR vocabulary and cache the teacher's token states: the command line of cifhkd.teacher_cache (--help lists the options)."""

from cifhkd.teacher_cache import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the ASR vocabulary and cache the teacher's token states: the command line of cifhkd.teacher_cache (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("teacher_cache")

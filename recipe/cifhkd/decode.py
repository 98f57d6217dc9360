"""Decode a split with a trained CIF-HKD model: greedy or beam search, CER and WER.

    python python/decode.py --checkpoint exp/hkd/averaged.pt --split data/demo/test \
        --out exp/hkd/decode-test --method beam --beam 10

CIF fires the number of output tokens n (tail threshold model_config.tail_threshold), and
a wrong n shifts every later token against its CIF embedding, so decoding also tries the
counts n - R .. n + R (--count-search R, default 2): for each count the alphas
are scaled to sum to it, as in training, and a beam search forced to that length runs
(count - 1 ordinary tokens, then [SEP]). Beams (--beam, 10 by default) are ranked by the
decoder's summed log-probabilities; batches of utterances and all their candidate counts
are decoded together, with the decoder's key/value cache. --method greedy is a beam of one.

Every hypothesis of every count's final beam is then rescored with the CTC branch, as in
joint CTC/attention decoding: score = ((1 - w) * decoder log-prob + w * CTC log-prob) /
count, and the best score wins (--ctc-weight w, default 0.3 for models trained with CTC;
0 keeps the decoder's mean log-probability alone).

Writes OUT/hyp.txt (``<utt> <hypothesis>``), OUT/hyp.jsonl (id, ref, hyp, tokens, token
start times in seconds: the token's CIF fire frame x the encoder frame period, 80 ms with
8x subsampling, and the utterance's chars and char_errors) and OUT/wer.json (WER, CER
over characters without spaces; see score()). The split is checked when it is loaded
(data.load_manifest): a malformed line, unreadable audio or audio holding NaN is an error
naming its manifest line and file, and so is a split with no utterances.

The model and its vocabulary come from the checkpoint alone (load_checkpoint: it carries
model_config, the vocabulary and the tokenizer's identity), never from a tokens.txt found
elsewhere; the transcripts are tokenised with the tokenizer it was trained with, checked
by the SHA-256 of its files (checkpoint_tokenizer).

    python python/decode.py --onnx exp/hkd/onnx --split data/demo/test --out exp/hkd/decode-onnx

decodes with an export of export_onnx.py in ONNX Runtime instead (cifhkd.onnx_asr: the
same search and scores; --int8 for its int8 graphs, --threads for ONNX Runtime's
threads), and writes the same files.
"""

import argparse
import dataclasses
import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import cifops
from . import batch as batch_lib
from . import data
from . import dataset as dataset_lib
from . import model as model_lib
from . import sampler as sampler_lib
from . import teacher as teacher_lib

FBANK_SHIFT_S = 0.010
COUNT_SEARCH = 2
CTC_WEIGHT = 0.3
BEAM = 10
MAX_BATCH_SECONDS = 120.0


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="train_hkd.py's averaged.pt or checkpoint-<step>.pt")
    model.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="an export folder of export_onnx.py: decode with ONNX Runtime "
        "(cifhkd.onnx_asr) instead of the checkpoint in PyTorch",
    )
    parser.add_argument("--split", type=Path, required=True, help="Kaldi dir or JSONL manifest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="tokens.txt, for a checkpoint of an older cifhkd that kept only the path of its "
        "vocabulary (default: that path); a checkpoint that carries its vocabulary "
        "decodes with it and refuses a different one",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="tokenizer folder (default: the one the checkpoint was trained with, checked "
        "against the identity it records; older checkpoints: MiniLM)",
    )
    parser.add_argument("--method", choices=["greedy", "beam"], default="beam", help="greedy: a beam of one")
    parser.add_argument("--beam", type=int, default=BEAM)
    parser.add_argument(
        "--count-search",
        type=int,
        default=COUNT_SEARCH,
        help="also try this many token counts either side of the one CIF fires "
        "and keep the hypothesis with the best score per token (0: CIF's "
        "count only)",
    )
    parser.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help="weight w of the CTC branch in the hypothesis score "
        "(1 - w) * decoder + w * CTC log-probability; default "
        f"{CTC_WEIGHT} for a model trained with CTC, else 0",
    )
    parser.add_argument(
        "--reference-counts",
        action="store_true",
        help="a diagnostic: centre the count search on each transcript's token "
        "count + [SEP] instead of CIF's (--count-search 0: decode with the "
        "reference count; shows what CIF's count errors cost)",
    )
    parser.add_argument("--max-batch-seconds", type=float, default=MAX_BATCH_SECONDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--int8", action="store_true", help="with --onnx: the int8 graphs (export --int8)")
    parser.add_argument(
        "--threads", type=int, default=0, help="with --onnx: ONNX Runtime's intra-op threads (0: its default)"
    )
    return parser


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def tokenizer_record(teacher=None) -> dict:
    """The identity of a teacher's tokenizer: its folder (None: the default teacher) and
    the SHA-256 over its tokenizer files (TOKENIZER_FILES, those present)."""
    path = Path(teacher).resolve() if teacher is not None else teacher_lib.default_teacher_path()
    digest, names = hashlib.sha256(), []
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            names.append(name)
            digest.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    return {"teacher": None if teacher is None else str(path), "files": names, "sha256": digest.hexdigest()}


def decoding_record(vocab: teacher_lib.TokenVocab, teacher=None) -> dict:
    """What a checkpoint carries for decoding besides its model_config: the vocabulary
    itself and the tokenizer's identity (tokenizer_record)."""
    return {
        "vocab": {"tokens": list(vocab.tokens), "teacher_ids": list(vocab.teacher_ids)},
        "tokenizer": tokenizer_record(teacher),
    }


@dataclasses.dataclass
class Trained:
    """A checkpoint loaded for decoding: the model (eval mode), its vocabulary, and the
    checkpoint's dict (state["tokenizer"]: the tokenizer's identity, absent in older ones)."""

    model: model_lib.CifHkdModel
    vocab: teacher_lib.TokenVocab
    state: dict
    path: Path


def load_checkpoint(path, device="cpu", vocab=None) -> Trained:
    """The model and vocabulary of a trainer's checkpoint-<step>.pt or averaged.pt (the one
    way to load a trained model). The vocabulary is the one the checkpoint carries; `vocab`
    (a tokens.txt) must then be the same, else ValueError. A checkpoint of an older cifhkd
    keeps only the path of its vocabulary: `vocab`, or that path, is loaded (and must have
    the model's size); FileNotFoundError saying to pass --vocab when it is gone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decode: --checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a cifhkd checkpoint (torch.load failed: {e})") from e
    if not (isinstance(state, dict) and "model" in state and "model_config" in state and "vocab" in state):
        raise ValueError(f"{path}: not a cifhkd checkpoint (no model, model_config and vocab)")
    config = dict(state["model_config"])
    config["pool_after"] = tuple(config["pool_after"])
    config.setdefault("block_final_norm", True)  # checkpoints from before the switch had it
    model = model_lib.CifHkdModel(model_lib.ModelConfig(**config))
    model.load_state_dict(state["model"])
    carried = state["vocab"]
    if isinstance(carried, dict):
        own = teacher_lib.TokenVocab(carried["tokens"], carried["teacher_ids"])
        if vocab is not None:
            other = teacher_lib.TokenVocab.load(vocab)
            pairs = list(zip(own.tokens, own.teacher_ids))
            other_pairs = list(zip(other.tokens, other.teacher_ids))
            if pairs != other_pairs:
                first = next(
                    (i for i, (a, b) in enumerate(zip(pairs, other_pairs)) if a != b), min(len(pairs), len(other_pairs))
                )
                raise ValueError(
                    f"decode: --vocab {vocab} differs from the vocabulary of {path}, which it was trained "
                    f"with ({len(other)} against {len(own)} tokens; first difference at id {first}): the "
                    "checkpoint decodes with its own; leave --vocab out"
                )
    else:
        source = Path(vocab if vocab is not None else carried)
        if not source.is_file():
            raise FileNotFoundError(
                f"{path}: a checkpoint of an older cifhkd, which keeps only the path of its vocabulary, "
                f"{source}, and that file is missing: pass --vocab with the tokens.txt it was trained with"
            )
        own = teacher_lib.TokenVocab.load(source)
    if len(own) != model.config.vocab_size:
        raise ValueError(f"decode: the vocabulary of {path} has {len(own)} tokens, its model {model.config.vocab_size}")
    return Trained(model.to(device).eval(), own, state, path)


def checkpoint_tokenizer(trained: Trained, teacher=None):
    """The tokenizer to read a split's transcripts with: `teacher`'s (a model folder), by
    default the one the checkpoint was trained with; ValueError when its identity differs
    from the checkpoint's record (older checkpoints have none: MiniLM by default)."""
    record = trained.state.get("tokenizer")
    if not isinstance(record, dict):
        return teacher_lib.load_tokenizer(teacher)
    if teacher is None and record.get("teacher") is not None:
        teacher = record["teacher"]
        if not Path(teacher).is_dir():
            raise FileNotFoundError(
                f"decode: {trained.path} was trained with the tokenizer of {teacher}, which "
                "is missing: pass --teacher with a folder holding the same tokenizer files"
            )
    found = tokenizer_record(teacher)
    if found["sha256"] != record.get("sha256"):
        raise ValueError(
            f"decode: the tokenizer of {teacher or 'the default teacher'} is not the one "
            f"{trained.path} was trained with ({record.get('teacher') or 'the default teacher'}: "
            f"the SHA-256 of its {', '.join(record.get('files', []))} differs): pass --teacher with "
            "that tokenizer's folder"
        )
    return teacher_lib.load_tokenizer(teacher)


def frame_period_s(config: model_lib.ModelConfig) -> float:
    """Seconds per encoder frame: 10 ms fbank shift x 2 (Conv2d) x 2 per pooling layer."""
    return FBANK_SHIFT_S * 2 * 2 ** len(config.pool_after)


def token_count_candidates(
    model, encoded: Tuple[Tensor, Tensor, Tensor], count_search: int, reference_counts: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """CIF with 2 * count_search + 1 token counts per utterance: n - count_search .. n +
    count_search (at least 1), n being the count CIF fires with the tail threshold, or
    reference_counts [B] (the transcript's tokens + [SEP]; a diagnostic) in place of n.
    Each candidate scales the alphas to its count, as training does with the reference.
    encoded: model.encode's (enc, enc_lens, alphas).

    -> (cif [C*B, N, D], counts [C*B], fire_frames [C*B, N]), candidate-major: row
    c * B + b is utterance b with count n_b + c - count_search. An utterance whose weights
    sum to zero (no frames) gets count 0."""
    c = model.config
    enc, enc_lens, alphas = encoded
    fired = cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, tail_threshold=c.tail_threshold)
    nonzero = fired.alpha_sum > 0
    centre = fired.token_lengths if reference_counts is None else reference_counts.to(fired.token_lengths)
    outs = []
    for delta in range(-count_search, count_search + 1):
        counts = torch.where(nonzero, torch.clamp(centre + delta, min=1), torch.zeros_like(centre))
        outs.append(cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, target_lengths=counts))
    n = max(o.embeds.shape[1] for o in outs)
    cif = torch.cat([F.pad(o.embeds, (0, 0, 0, n - o.embeds.shape[1])) for o in outs])
    fire = torch.cat([F.pad(o.fire_frames, (0, n - o.fire_frames.shape[1]), value=-1) for o in outs])
    return cif, torch.cat([o.token_lengths for o in outs]), fire


@torch.no_grad()
def forced_beam_search(model, cif: Tensor, counts: Tensor, beam: int) -> Tuple[List[List[List[int]]], Tensor]:
    """Beam search over R rows of CIF tokens, each row's hypothesis exactly counts[r]
    steps long: counts[r] - 1 tokens (neither blank nor [SEP]), then [SEP]. Uses the
    decoder's key/value cache (CifDecoder.step); rows are processed longest first, so a
    step computes only the rows that still have tokens.

    -> (per row its final beam of K = beam hypotheses, best first, as ASR ids without
    [SEP]; their log-probabilities [R, K], the final [SEP] included). A slot no sequence
    reached (a short row has fewer than K sequences) is empty and scores -inf; a row of
    count 0 has the empty hypothesis, scored 0, in slot 0."""
    rows, n, d = cif.shape
    k, device = beam, cif.device
    order = torch.argsort(counts, descending=True, stable=True)
    cif, counts = cif[order], counts[order]
    cif_k = cif.repeat_interleave(k, dim=0)  # [R*K, N, D]
    tokens = torch.zeros(rows, k, n, dtype=torch.long, device=device)
    scores = torch.full((rows, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live prefix at first
    prev = torch.full((rows * k,), model_lib.EOS_ID, dtype=torch.long, device=device)
    special = torch.tensor([model_lib.BLANK_ID, model_lib.EOS_ID], device=device)
    cache = None
    for i in range(int(counts[0]) if rows else 0):
        m = int((counts > i).sum())  # rows [0, m) still decode
        mk = m * k
        cif_prev = cif_k[:mk, i - 1] if i else cif.new_zeros(mk, d)
        cache = None if cache is None else [(keys[:mk], values[:mk]) for keys, values in cache]
        logits, cache = model.decoder.step(prev[:mk], cif_prev, cif_k[:mk, i], i, cache)
        logp = torch.log_softmax(logits.float(), dim=-1)
        v = logp.shape[-1]
        final = torch.full_like(logp, float("-inf"))
        final[:, model_lib.EOS_ID] = logp[:, model_lib.EOS_ID]
        is_last = (counts[:m] == i + 1).repeat_interleave(k)[:, None]
        logp = torch.where(is_last, final, logp.index_fill(1, special, float("-inf")))
        candidates = (scores[:m, :, None] + logp.view(m, k, v)).view(m, k * v)
        scores[:m], top = candidates.topk(k, dim=-1)
        origin, token = top // v, top % v
        tokens[:m] = torch.gather(tokens[:m], 1, origin[:, :, None].expand(-1, -1, n))
        tokens[:m, :, i] = token
        flat = (torch.arange(m, device=device)[:, None] * k + origin).view(-1)
        cache = [(keys[flat], values[flat]) for keys, values in cache]
        prev = token.view(-1)
    hyps: List[List[List[int]]] = [[] for _ in range(rows)]
    reached = torch.isfinite(scores).tolist()
    for sorted_row, row in enumerate(order.tolist()):
        beam_tokens = tokens[sorted_row, :, : max(int(counts[sorted_row]) - 1, 0)].tolist()
        hyps[row] = [seq if ok else [] for seq, ok in zip(beam_tokens, reached[sorted_row])]
    out_scores = torch.empty_like(scores)
    out_scores[order] = scores  # topk keeps each beam sorted
    return hyps, out_scores


def ctc_logprobs(
    model, enc: Tensor, enc_lens: Tensor, hyps: List[List[int]], utts: Tensor, max_elements: int = 2**26
) -> Tensor:
    """log P_CTC(hyps[i] | utterance utts[i]) from the CTC branch over the encoder frames
    (enc [B, T, D], enc_lens [B]); -inf where no alignment exists. Hypotheses are scored
    in chunks whose copies of the frame log-probabilities hold at most max_elements
    numbers.  -> [len(hyps)]"""
    log_probs = model.ctc_log_probs(enc)  # [T, B, V]
    chunk = max(1, max_elements // (log_probs.shape[0] * log_probs.shape[2]))
    out = []
    for start in range(0, len(hyps), chunk):
        part, index = hyps[start : start + chunk], utts[start : start + chunk]
        lengths = torch.tensor([len(h) for h in part], dtype=torch.long)
        targets = torch.tensor([t for h in part for t in h], dtype=torch.long, device=enc.device)
        out.append(
            -F.ctc_loss(
                log_probs[:, index], targets, enc_lens[index].cpu(), lengths, blank=model_lib.BLANK_ID, reduction="none"
            )
        )
    return torch.cat(out) if out else log_probs.new_zeros(0)


def resolve_ctc_weight(model, ctc_weight: Optional[float], option: str = "ctc_weight") -> float:
    """The CTC weight to decode with: CTC_WEIGHT by default when the model was trained with
    its CTC branch (model_config.ctc_weight > 0), else 0; an explicit weight is checked."""
    trained = model.config.ctc_weight > 0
    if ctc_weight is None:
        return CTC_WEIGHT if trained else 0.0
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"decode: {option} must be in [0, 1], got {ctc_weight}")
    if ctc_weight > 0 and not trained:
        raise ValueError(
            f"decode: {option} {ctc_weight} needs a model trained with its CTC branch "
            "(its model_config.ctc_weight is 0); decode with 0"
        )
    return float(ctc_weight)


@torch.no_grad()
def beam_search(
    model,
    feats: Tensor,
    feat_lens: Tensor,
    beam: int = 10,
    count_search: int = COUNT_SEARCH,
    ctc_weight: Optional[float] = None,
    reference_counts: Optional[Tensor] = None,
) -> List[Tuple[List[int], List[int]]]:
    """Decode B utterances: forced_beam_search for every candidate token count of
    token_count_candidates, then per utterance, over every count's final beam, the
    hypothesis with the best ((1 - w) * decoder log-prob + w * CTC log-prob) / count
    (the final [SEP] is in the decoder's log-prob and in count; w = resolve_ctc_weight's).

    -> per utterance (ASR ids without [SEP], fire frame of each)."""
    if beam < 1:
        raise ValueError(f"beam_search: beam must be >= 1, got {beam}")
    if count_search < 0:
        raise ValueError(f"beam_search: count_search must be >= 0, got {count_search}")
    w = resolve_ctc_weight(model, ctc_weight)
    b = feats.shape[0]
    encoded = model.encode(feats, feat_lens)
    cif, counts, fire = token_count_candidates(model, encoded, count_search, reference_counts)
    hyps, logp = forced_beam_search(model, cif, counts, beam)  # [C*B] x K, [C*B, K]
    score = logp
    if w > 0:
        flat = [h for row in hyps for h in row]
        utts = (torch.arange(len(flat), device=feats.device) // beam) % b
        ctc = ctc_logprobs(model, encoded[0], encoded[1], flat, utts).view_as(logp).to(logp)
        score = torch.where(torch.isfinite(logp), (1 - w) * logp + w * ctc, float("-inf"))
    score = score / counts.clamp(min=1)[:, None]
    best = score.view(2 * count_search + 1, b, beam).permute(1, 0, 2).reshape(b, -1).argmax(-1)
    results = []
    for u, index in enumerate(best.tolist()):
        row, slot = (index // beam) * b + u, index % beam
        results.append((hyps[row][slot], fire[row, : len(hyps[row][slot])].tolist()))
    return results


def greedy_search(
    model, feats: Tensor, feat_lens: Tensor, count_search: int = COUNT_SEARCH, ctc_weight: Optional[float] = None
) -> List[Tuple[List[int], List[int]]]:
    """beam_search with a beam of one."""
    return beam_search(model, feats, feat_lens, 1, count_search, ctc_weight)


def score(refs: List[str], hyps: List[str]) -> dict:
    """WER over words and CER over characters (spaces removed) with jiwer."""
    import jiwer

    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters([r.replace(" ", "") for r in refs], [h.replace(" ", "") for h in hyps])
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "words": sum(len(r.split()) for r in refs),
        "word_errors": words.substitutions + words.deletions + words.insertions,
        "chars": sum(len(r.replace(" ", "")) for r in refs),
        "char_errors": chars.substitutions + chars.deletions + chars.insertions,
        "utterances": len(refs),
    }


def decode(
    checkpoint: Optional[Union[str, Path]],
    split: Union[str, Path],
    out: Union[str, Path],
    *,
    vocab: Optional[Path] = None,
    teacher: Optional[str] = None,
    method: str = "beam",
    beam: int = BEAM,
    count_search: int = COUNT_SEARCH,
    ctc_weight: Optional[float] = None,
    reference_counts: bool = False,
    max_batch_seconds: float = MAX_BATCH_SECONDS,
    device: str = "cpu",
    onnx: Optional[Union[str, Path]] = None,
    int8: bool = False,
    threads: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Decode the split with the checkpoint into OUT (the module docstring; the arguments
    are the command line's options; paths as str or Path) and return the scores of
    wer.json; `log` gets the one-line summary. With onnx (an export folder) instead of a
    checkpoint, ONNX Runtime decodes (cifhkd.onnx_asr; int8, threads: its options)."""
    split, out = Path(split), Path(out)
    if (checkpoint is None) == (onnx is None):
        raise ValueError("decode: give a checkpoint or an ONNX export (--onnx), one of them")
    if beam < 1:
        raise ValueError(f"decode: --beam must be >= 1, got {beam}")
    if count_search < 0:
        raise ValueError(f"decode: --count-search must be >= 0, got {count_search}")
    if onnx is None and (int8 or threads):
        raise ValueError("decode: --int8 and --threads are options of --onnx (ONNX Runtime)")
    if onnx is None:
        device = torch.device(device)
        trained = load_checkpoint(checkpoint, device, vocab)
        model, vocab = trained.model, trained.vocab
        ctc_weight = resolve_ctc_weight(model, ctc_weight, "--ctc-weight")
        tokenizer = checkpoint_tokenizer(trained, teacher)
        period = frame_period_s(model.config)
    else:
        recognizer = onnx_recognizer(
            Path(onnx),
            int8=int8,
            threads=threads,
            vocab=vocab,
            method=method,
            beam=beam,
            count_search=count_search,
            ctc_weight=ctc_weight,
            reference_counts=reference_counts,
            max_batch_seconds=max_batch_seconds,
            device=device,
        )
        vocab = teacher_lib.TokenVocab.load(Path(onnx) / recognizer.config["files"]["tokens"])
        ctc_weight, period = recognizer.ctc_weight, recognizer.frame_period_s
        tokenizer = teacher_lib.load_tokenizer(teacher)
    utts, _ = data.load_manifest(split)
    items = dataset_lib.AsrDataset(utts, vocab, tokenizer)
    sampler = sampler_lib.BucketBatchSampler([u.duration for u in utts], max_batch_seconds, shuffle=False)
    out.mkdir(parents=True, exist_ok=True)
    rows, start, audio_s = {}, time.perf_counter(), 0.0
    for indices in sampler:
        if onnx is None:
            batch = batch_lib.collate([items[i] for i in indices])
            feats, feat_lens = batch.feats.to(device), batch.feat_lens.to(device)
            reference = batch.token_lens.to(device) + 1 if reference_counts else None
            results = beam_search(
                model, feats, feat_lens, 1 if method == "greedy" else beam, count_search, ctc_weight, reference
            )
        else:
            from . import onnx_asr

            names = [f"{utts[i].source}: {utts[i].id}: {utts[i].audio}" for i in indices]
            samples = [
                onnx_asr.load_samples(utts[i].audio, recognizer.sample_rate, name) for i, name in zip(indices, names)
            ]
            results = recognizer.decode_samples(samples, names)
        for i, (tokens, frames) in zip(indices, results):
            utt = utts[i]
            audio_s += utt.duration
            rows[utt.id] = {
                "id": utt.id,
                "ref": utt.text,
                "hyp": vocab.decode(tokens),
                "tokens": [vocab.tokens[t] for t in tokens],
                "start_s": [round(f * period, 3) for f in frames],
            }
    elapsed = time.perf_counter() - start
    ordered = [rows[u.id] for u in utts]
    # references are compared in the vocabulary's spelling (the uncased teacher lowercases)
    refs = [
        vocab.decode(items.tokens[i].tolist()) if vocab.UNK not in items.tokens[i].tolist() else u.text.lower()
        for i, u in enumerate(utts)
    ]
    result = score(refs, [r["hyp"] for r in ordered])
    by_speaker = {}  # where one held-out voice is much harder, it shows here
    for u, ref, r in zip(utts, refs, ordered):
        if u.speaker:
            pair = by_speaker.setdefault(u.speaker, ([], []))
            pair[0].append(ref)
            pair[1].append(r["hyp"])
    if by_speaker:
        result["per_speaker"] = {
            spk: {k: v for k, v in score(*by_speaker[spk]).items() if k in ("cer", "wer", "chars", "utterances")}
            for spk in sorted(by_speaker)
        }
    result.update(
        {
            "method": method,
            "beam": beam if method == "beam" else 1,
            "count_search": count_search,
            "ctc_weight": ctc_weight,
            "reference_counts": reference_counts,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "split": str(split),
            **({} if onnx is None else {"onnx": str(onnx), "int8": int8}),
            "real_time_factor": elapsed / max(audio_s, 1e-9),
        }
    )
    with open(out / "hyp.txt", "w") as f:
        for r in ordered:
            f.write(f"{r['id']} {r['hyp']}\n")
    with open(out / "hyp.jsonl", "w") as f:
        for r, ref in zip(ordered, refs):  # per-utterance counts: for confidence intervals
            counts = score([ref], [r["hyp"]])
            f.write(
                json.dumps({**r, "ref": ref, "chars": counts["chars"], "char_errors": counts["char_errors"]}) + "\n"
            )
    (out / "wer.json").write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"decode{'' if onnx is None else ' (ONNX Runtime' + (', int8)' if int8 else ')')}: "
        f"{split} ({len(utts)} utterances, {method}"
        f"{'' if method == 'greedy' else f', beam {beam}'}): "
        f"CER {100 * result['cer']:.2f}%  WER {100 * result['wer']:.2f}%  "
        f"RTF {result['real_time_factor']:.3f} -> {out}"
    )
    return result


def onnx_recognizer(
    folder: Path,
    *,
    int8: bool,
    threads: int,
    vocab: Optional[Path],
    method: str,
    beam: int,
    count_search: int,
    ctc_weight: Optional[float],
    reference_counts: bool,
    max_batch_seconds: float,
    device: str,
):
    """decode's options for an ONNX export -> onnx_asr.OnnxRecognizer; the options that
    only the PyTorch decode has are refused, naming them."""
    for given, option in (
        (vocab is not None, "--vocab (the export has its tokens.txt)"),
        (reference_counts, "--reference-counts (a diagnostic of the PyTorch decode)"),
        (str(device) != "cpu", f"--device {device} (ONNX Runtime runs on the CPU)"),
    ):
        if given:
            raise ValueError(f"decode: --onnx does not take {option}")
    from . import onnx_asr  # needs onnxruntime, which the PyTorch decode does not

    return onnx_asr.OnnxRecognizer(
        folder,
        int8=int8,
        beam=1 if method == "greedy" else beam,
        count_search=count_search,
        ctc_weight=ctc_weight,
        max_batch_seconds=max_batch_seconds,
        threads=threads,
    )


def main(argv=None):
    return decode(**vars(get_parser().parse_args(argv)))


if __name__ == "__main__":  # python -m cifhkd.decode
    main()

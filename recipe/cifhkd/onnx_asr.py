"""Transcribe audio with an exported CIF-HKD model (cifhkd.export) in ONNX Runtime.

    from cifhkd.onnx_asr import OnnxRecognizer
    asr = OnnxRecognizer("exp/hkd/onnx")              # int8=True: the --int8 graphs
    asr.transcribe(["a.wav", "b.flac"])               # -> ["the text of a", "..."]
    asr.recognize(["a.wav"])[0].start_s               # tokens, their ids and start times

This module imports neither torch nor cifops: only numpy, onnxruntime, soundfile,
kaldi-native-fbank (cifhkd.fbank) and, for audio at another sample rate than 16 kHz,
soxr (cifhkd.data.load_audio resamples as decode.py does): `pip install cifhkd[onnx]`
without torch, or the repository's `./recipe[onnx]` extra.

Decoding is decode.py's (its module docstring), with the same scores: the token count
CIF fires, and the counts +-count_search around it, each a beam search over the decoder
forced to that length (count - 1 tokens, then [SEP]), the beams ranked by the summed
log-probabilities; every final hypothesis rescored ((1 - w) * decoder + w * CTC
log-probability) / count; the best wins. greedy is a beam of one. Utterances are batched
by duration (sampler.BucketBatchSampler, as decode.py batches them, max_batch_seconds of
padded audio a batch). beam_search below is decode.forced_beam_search in numpy, and
ctc_log_likelihoods decode.ctc_logprobs: tests/test_hkd_onnx.py checks that they agree.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort

from . import data
from . import fbank
from . import sampler as sampler_lib

FORMAT = "cifhkd-onnx"  # export.FORMAT (export imports torch: not imported here)
FORMAT_VERSION = 1  # export.FORMAT_VERSION: the newest format this module reads
CONFIG_FILE = "config.json"

Audio = Union[str, os.PathLike, np.ndarray]
# (prev_tokens [R], cif_prev [R, D], cif_cur [R, D], keys, values) -> (log_probs [R, V], keys, values)
StepFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]
]


class ExportError(ValueError):
    """A folder that is not a readable export (names what is wrong)."""


@dataclass
class Hypothesis:
    """One utterance's result: text, the ASR token ids and pieces (without [SEP]), and
    each token's start time in seconds (its CIF fire frame x the encoder frame period)."""

    text: str
    token_ids: List[int]
    tokens: List[str]
    start_s: List[float]


def read_export(folder: Union[str, os.PathLike], int8: bool = False) -> dict:
    """config.json of an export folder, checked: the format and its version, and every
    file it names present. Raises ExportError naming what is missing or wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder (an export of python/export_onnx.py)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ExportError(
            f"{folder} is not a CIF-HKD ONNX export: it has no {CONFIG_FILE} (make one with python/export_onnx.py)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ExportError(
            f"{path}: not a {FORMAT} config (format {config.get('format')!r})"
            if isinstance(config, dict)
            else f"{path}: not a {FORMAT} config"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {version!r} is newer than this cifhkd reads "
            f"({FORMAT_VERSION}): update cifops/cifhkd, or export again with this one"
        )
    for key in ("files", "features", "model", "decoding"):
        if not isinstance(config.get(key), dict):
            raise ExportError(f"{path}: the field {key!r} is missing")
    files = config["files"]
    if int8 and "int8" not in files:
        raise ExportError(f"{folder} has no int8 graphs: export with --int8 (or load it without int8)")
    names = [files["tokens"]] + (
        [files["int8"]["encoder"], files["int8"]["decoder"]] if int8 else [files["encoder"], files["decoder"]]
    )
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is an incomplete export: {', '.join(missing)} missing")
    return config


def read_tokens(path: Path) -> List[str]:
    """The pieces of tokens.txt (teacher.TokenVocab's file: `<piece> <teacher_id>` lines)."""
    tokens = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ExportError(f"{path}:{lineno}: expected '<piece> <teacher_id>', got {line!r}")
            tokens.append(parts[0])
    return tokens


def tokens_to_text(pieces: Sequence[str], ids: Sequence[int], blank_id: int = 0, eos_id: int = 1) -> str:
    """teacher.TokenVocab.decode: '##' pieces join the previous piece, apostrophes join
    both neighbours; blank and [SEP] are dropped."""
    text = ""
    for i in ids:
        i = int(i)
        if i in (blank_id, eos_id):
            continue
        piece = pieces[i]
        if piece.startswith("##") or piece == "'" or text.endswith("'"):
            text += piece[2:] if piece.startswith("##") else piece
        else:
            text += (" " if text else "") + piece
    return text


def _top_k(candidates: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the k largest values, largest first (ties: lower index
    first)."""
    n = candidates.shape[1]
    if k < n:
        part = np.argpartition(-candidates, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), candidates.shape)
    values = np.take_along_axis(candidates, part, 1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(part, order, 1)


def beam_search(
    step: StepFn,
    cif: np.ndarray,
    counts: np.ndarray,
    beam: int,
    cache_shape: Tuple[int, int, int],
    blank_id: int = 0,
    eos_id: int = 1,
) -> Tuple[List[List[List[int]]], np.ndarray]:
    """decode.forced_beam_search in numpy: R rows of CIF tokens cif [R, N, D], each row's
    hypotheses exactly counts[r] steps long (counts[r] - 1 tokens, neither blank nor
    [SEP], then [SEP]), with the decoder step's key/value cache; rows processed longest
    first. cache_shape: (layers, heads, head_dim).

    -> (per row its final beam, best first, as ids without [SEP]; their float32
    log-probabilities [R, beam], the final [SEP] included). A slot no sequence reached is
    empty and scores -inf; a row of count 0 has the empty hypothesis, scored 0."""
    rows, n, d = cif.shape
    k = beam
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    cif, counts = cif[order], counts[order]
    cif_k = np.repeat(cif, k, axis=0)  # [R*K, N, D]
    tokens = np.zeros((rows, k, n), dtype=np.int64)
    scores = np.full((rows, k), -np.inf, dtype=np.float32)
    scores[:, 0] = 0.0
    prev = np.full(rows * k, eos_id, dtype=np.int64)
    layers, heads, head_dim = cache_shape
    keys = values = np.zeros((layers, rows * k, heads, 0, head_dim), dtype=np.float32)
    for i in range(int(counts[0]) if rows else 0):
        m = int((counts > i).sum())
        mk = m * k
        cif_prev = cif_k[:mk, i - 1] if i else np.zeros((mk, d), dtype=cif.dtype)
        logp, keys, values = step(
            prev[:mk], np.ascontiguousarray(cif_prev), np.ascontiguousarray(cif_k[:mk, i]), keys[:, :mk], values[:, :mk]
        )
        v = logp.shape[-1]
        is_last = np.repeat(counts[:m] == i + 1, k)
        logp = logp.copy()
        eos = logp[:, eos_id].copy()
        logp[:, [blank_id, eos_id]] = -np.inf
        logp[is_last] = -np.inf
        logp[is_last, eos_id] = eos[is_last]
        candidates = (scores[:m, :, None] + logp.reshape(m, k, v)).reshape(m, k * v)
        top = _top_k(candidates, k)
        scores[:m] = np.take_along_axis(candidates, top, 1)
        origin, token = top // v, top % v
        tokens[:m] = np.take_along_axis(tokens[:m], origin[:, :, None], 1)
        tokens[:m, :, i] = token
        flat = (np.arange(m)[:, None] * k + origin).reshape(-1)
        keys, values = keys[:, flat], values[:, flat]
        prev = token.reshape(-1)
    hyps: List[List[List[int]]] = [[] for _ in range(rows)]
    reached = np.isfinite(scores)
    for sorted_row, row in enumerate(order.tolist()):
        length = max(int(counts[sorted_row]) - 1, 0)
        hyps[row] = [tokens[sorted_row, j, :length].tolist() if reached[sorted_row, j] else [] for j in range(k)]
    out_scores = np.empty_like(scores)
    out_scores[order] = scores
    return hyps, out_scores


def ctc_log_likelihoods(
    log_probs: np.ndarray,
    lengths: np.ndarray,
    hyps: Sequence[Sequence[int]],
    utts: np.ndarray,
    blank_id: int = 0,
    max_elements: int = 2**24,
) -> np.ndarray:
    """log P_CTC(hyps[i] | utterance utts[i]) (decode.ctc_logprobs): the CTC forward
    algorithm in float64 over the frame log-probabilities log_probs [B, T, V] of the
    lengths[b] valid frames; -inf where no alignment exists. Hypotheses go in chunks of
    at most max_elements emission numbers.  -> float32 [len(hyps)]"""
    out = np.full(len(hyps), -np.inf, dtype=np.float64)
    if not len(hyps):
        return out.astype(np.float32)
    t_max = log_probs.shape[1]
    longest = max(len(h) for h in hyps)
    chunk = max(1, max_elements // (t_max * (2 * longest + 1)))
    for start in range(0, len(hyps), chunk):
        part, index = hyps[start : start + chunk], np.asarray(utts[start : start + chunk])
        h, s = len(part), 2 * max(len(p) for p in part) + 1
        ext = np.full((h, s), blank_id, dtype=np.int64)  # blank, y1, blank, y2, ..., blank
        for j, p in enumerate(part):
            ext[j, 1 : 2 * len(p) : 2] = p
        states = np.array([2 * len(p) + 1 for p in part])
        # a label may be skipped to from two back when it differs from that one's label
        skip = np.zeros((h, s), dtype=bool)
        skip[:, 2:] = (ext[:, 2:] != blank_id) & (ext[:, 2:] != ext[:, :-2])
        frames = lengths[index]
        emit = log_probs[index[:, None, None], np.arange(t_max)[None, :, None], ext[:, None, :]].astype(
            np.float64
        )  # [h, T, S]
        alpha = np.full((h, s), -np.inf)
        alpha[:, 0] = emit[:, 0, 0]
        if s > 1:
            alpha[:, 1] = emit[:, 0, 1]
        alpha[np.arange(s)[None, :] >= states[:, None]] = -np.inf
        for t in range(1, t_max):
            a1 = np.concatenate([np.full((h, 1), -np.inf), alpha[:, :-1]], 1)
            a2 = np.concatenate([np.full((h, 2), -np.inf), alpha[:, :-2]], 1)
            a2 = np.where(skip, a2, -np.inf)
            top = np.maximum(np.maximum(alpha, a1), a2)
            safe = np.where(np.isfinite(top), top, 0.0)
            with np.errstate(divide="ignore"):
                total = safe + np.log(np.exp(alpha - safe) + np.exp(a1 - safe) + np.exp(a2 - safe))
            new = np.where(np.isfinite(top), total + emit[:, t], -np.inf)
            alpha = np.where((t < frames)[:, None], new, alpha)
        last = alpha[np.arange(h), states - 1]
        before = np.where(states > 1, alpha[np.arange(h), np.maximum(states - 2, 0)], -np.inf)
        out[start : start + h] = np.logaddexp(last, before)
        out[start : start + h][frames == 0] = -np.inf
    return out.astype(np.float32)


def load_samples(audio: Audio, sample_rate: int, name: Optional[str] = None) -> np.ndarray:
    """One utterance as float32 mono samples at sample_rate: a file (read, mixed down and
    resampled by data.load_audio), or a 1-D float array already at sample_rate. A missing,
    unreadable, empty, too short (no 25 ms window) or non-finite input is an error naming
    it (name, default the file's path)."""
    if isinstance(audio, np.ndarray):
        name = name or "audio array"
        if audio.ndim != 1:
            raise ValueError(
                f"{name}: audio arrays must be 1-D [num_samples] at {sample_rate} Hz, got shape {audio.shape}"
            )
        samples = audio.astype(np.float32, copy=False)
        if not np.isfinite(samples).all():
            raise ValueError(f"{name}: holds NaN or infinite samples")
    else:
        path = os.fspath(audio)
        name = name or path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such audio file")
        samples = data.load_audio(path, sample_rate)  # ManifestError (a ValueError) naming it
    if len(samples) == 0:
        raise ValueError(f"{name}: the audio is empty (no samples)")
    if fbank.num_fbank_frames(len(samples), sample_rate) == 0:
        raise ValueError(
            f"{name}: the audio is {len(samples) / sample_rate * 1000:.1f} ms long, shorter than one 25 ms fbank window"
        )
    return samples


class OnnxRecognizer:
    """An exported CIF-HKD model in ONNX Runtime (the module docstring).

    Args:
        model_dir: export.py's folder (ExportError when it is not one).
        int8: use the dynamically quantized graphs (export --int8).
        beam, count_search, ctc_weight, max_batch_seconds: decode.py's options; default
            the export's config.json ("decoding": decode.py's defaults). ctc_weight > 0
            needs a model trained with its CTC branch.
        threads: ONNX Runtime's intra-op threads (0: its default, every core).
    """

    def __init__(
        self,
        model_dir: Union[str, os.PathLike],
        *,
        int8: bool = False,
        beam: Optional[int] = None,
        count_search: Optional[int] = None,
        ctc_weight: Optional[float] = None,
        max_batch_seconds: Optional[float] = None,
        threads: int = 0,
    ):
        self.model_dir = Path(model_dir)
        self.config = read_export(self.model_dir, int8)
        files, model, defaults = self.config["files"], self.config["model"], self.config["decoding"]
        self.tokens = read_tokens(self.model_dir / files["tokens"])
        if len(self.tokens) != model["vocab_size"]:
            raise ExportError(
                f"{self.model_dir / files['tokens']} has {len(self.tokens)} tokens, the model {model['vocab_size']}"
            )
        self.beam = int(defaults["beam"] if beam is None else beam)
        self.count_search = int(defaults["count_search"] if count_search is None else count_search)
        self.max_batch_seconds = float(
            defaults["max_batch_seconds"] if max_batch_seconds is None else max_batch_seconds
        )
        if self.beam < 1:
            raise ValueError(f"OnnxRecognizer: beam must be >= 1, got {self.beam}")
        if self.count_search < 0:
            raise ValueError(f"OnnxRecognizer: count_search must be >= 0, got {self.count_search}")
        if not self.max_batch_seconds > 0:
            raise ValueError(f"OnnxRecognizer: max_batch_seconds must be > 0, got {self.max_batch_seconds}")
        if threads < 0:
            raise ValueError(f"OnnxRecognizer: threads must be >= 0, got {threads}")
        if ctc_weight is None:
            ctc_weight = defaults["ctc_weight"]
        elif not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"OnnxRecognizer: ctc_weight must be in [0, 1], got {ctc_weight}")
        elif ctc_weight > 0 and not model["ctc_trained"]:
            raise ValueError(
                f"OnnxRecognizer: ctc_weight {ctc_weight} needs a model trained with its "
                "CTC branch (this one was not); decode with 0"
            )
        self.ctc_weight = float(ctc_weight)
        self.sample_rate = int(self.config["features"]["sample_rate"])
        self.num_mel_bins = int(self.config["features"]["num_mel_bins"])
        self.frame_period_s = float(model["frame_period_s"])
        self.max_tokens = int(model["max_tokens"])
        self.blank_id, self.eos_id = int(model["blank_id"]), int(model["eos_id"])
        heads = int(model["decoder_heads"])
        self.cache_shape = (int(model["decoder_layers"]), heads, int(model["d_model"]) // heads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no busy-waiting of the intra-op threads between and after runs: the search runs
        # on the host between decoder steps, and spinning threads would take its cores
        # (2x slower with 2 threads on a shared 2-core machine: benchmarks/RESULTS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graphs = files["int8"] if int8 else files
        self.encoder = ort.InferenceSession(
            str(self.model_dir / graphs["encoder"]), options, providers=["CPUExecutionProvider"]
        )
        self.decoder = ort.InferenceSession(
            str(self.model_dir / graphs["decoder"]), options, providers=["CPUExecutionProvider"]
        )

    # --- the parts -----------------------------------------------------------------------

    def features(self, samples: np.ndarray) -> np.ndarray:
        """fbank + utterance CMVN of one utterance's samples: [T, num_mel_bins] float32."""
        return fbank.utterance_cmvn(fbank.compute_fbank(samples, self.sample_rate, self.num_mel_bins))

    def step(
        self, prev: np.ndarray, cif_prev: np.ndarray, cif_cur: np.ndarray, keys: np.ndarray, values: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step (decoder.onnx): -> (log_probs [R, V], new keys, new values)."""
        return tuple(
            self.decoder.run(
                None, {"prev_token": prev, "cif_prev": cif_prev, "cif_cur": cif_cur, "keys": keys, "values": values}
            )
        )

    def encode(self, feats: Sequence[np.ndarray]) -> dict:
        """encoder.onnx on a batch of features (zero padded): its outputs by name."""
        lens = np.array([len(f) for f in feats], dtype=np.int64)
        batch = np.zeros((len(feats), int(lens.max()), self.num_mel_bins), dtype=np.float32)
        for b, f in enumerate(feats):
            batch[b, : len(f)] = f
        offsets = np.arange(-self.count_search, self.count_search + 1, dtype=np.int64)
        names = [o.name for o in self.encoder.get_outputs()]
        return dict(zip(names, self.encoder.run(None, {"feats": batch, "feat_lens": lens, "count_offsets": offsets})))

    def decode_features(
        self, feats: Sequence[np.ndarray], names: Optional[Sequence[str]] = None
    ) -> List[Tuple[List[int], List[int]]]:
        """Decode one batch of utterances' features ([T, F] float32 each, utterance
        CMVN): decode.beam_search. names: the utterances' names, for the error raised
        when one needs more tokens than the export's max_tokens.

        -> per utterance (ASR ids without [SEP], the fire frame of each)."""
        b = len(feats)
        out = self.encode(feats)
        need = out["counts"] + self.count_search
        if (need > self.max_tokens).any():
            u = int(np.argmax(need > self.max_tokens))
            name = names[u] if names is not None else f"utterance {u} of the batch"
            raise ValueError(
                f"{name}: CIF fires {int(out['counts'][u])}"
                f"{'+' if out['counts'][u] > self.max_tokens else ''} tokens; with the count "
                f"search (+{self.count_search}) that is more than this export's max_tokens "
                f"{self.max_tokens}: export again with a larger --max-tokens, or split the audio"
            )
        c = 2 * self.count_search + 1
        n = max(int(out["cif_counts"].max()), 1)
        cif = out["cif"][:, :, :n].reshape(c * b, n, -1)  # candidate-major
        counts = out["cif_counts"].reshape(-1)
        fire = out["fire_frames"][:, :, :n].reshape(c * b, n)
        hyps, logp = beam_search(self.step, cif, counts, self.beam, self.cache_shape, self.blank_id, self.eos_id)
        score = logp
        w = np.float32(self.ctc_weight)
        if w > 0:
            flat = [h for row in hyps for h in row]
            utts = (np.arange(len(flat)) // self.beam) % b
            ctc = ctc_log_likelihoods(out["ctc_log_probs"], out["enc_lens"], flat, utts, self.blank_id).reshape(
                logp.shape
            )
            with np.errstate(invalid="ignore"):
                score = np.where(np.isfinite(logp), (1 - w) * logp + w * ctc, np.float32(-np.inf))
        score = (score / np.maximum(counts, 1).astype(np.float32)[:, None]).astype(np.float32)
        best = score.reshape(c, b, self.beam).transpose(1, 0, 2).reshape(b, -1).argmax(-1)
        results = []
        for u, index in enumerate(best.tolist()):
            row, slot = (index // self.beam) * b + u, index % self.beam
            hyp = hyps[row][slot]
            results.append((hyp, fire[row, : len(hyp)].tolist()))
        return results

    def hypothesis(self, ids: Sequence[int], frames: Sequence[int]) -> Hypothesis:
        return Hypothesis(
            tokens_to_text(self.tokens, ids, self.blank_id, self.eos_id),
            list(ids),
            [self.tokens[i] for i in ids],
            [round(f * self.frame_period_s, 3) for f in frames],
        )

    # --- the API ---------------------------------------------------------------------------

    def recognize(self, audio: Sequence[Audio]) -> List[Hypothesis]:
        """Transcribe files (any format soundfile reads; resampled to 16 kHz) or 1-D float
        arrays of 16 kHz samples, batched by duration; results in the input's order.
        Raises ValueError (or FileNotFoundError) naming an unreadable, empty, too short or
        non-finite input."""
        if isinstance(audio, (str, os.PathLike, np.ndarray)):
            raise TypeError("OnnxRecognizer: pass a list of files or arrays, not one")
        names = [
            f"audio[{i}] (an array)" if isinstance(item, np.ndarray) else os.fspath(item)
            for i, item in enumerate(audio)
        ]
        samples = [load_samples(item, self.sample_rate, name) for item, name in zip(audio, names)]
        if not samples:
            return []
        return [self.hypothesis(ids, frames) for ids, frames in self.decode_samples(samples, names)]

    def decode_samples(
        self, samples: Sequence[np.ndarray], names: Optional[Sequence[str]] = None
    ) -> List[Tuple[List[int], List[int]]]:
        """Checked 16 kHz samples (load_samples) -> per utterance (ids, fire frames), in
        order, decoded in batches of at most max_batch_seconds padded seconds."""
        durations = [len(s) / self.sample_rate for s in samples]
        results: List[Optional[Tuple[List[int], List[int]]]] = [None] * len(samples)
        sampler = sampler_lib.BucketBatchSampler(durations, self.max_batch_seconds, shuffle=False)
        for indices in sampler:
            feats = [self.features(samples[i]) for i in indices]
            batch_names = [names[i] for i in indices] if names is not None else None
            for i, result in zip(indices, self.decode_features(feats, batch_names)):
                results[i] = result
        return results

    def transcribe(self, audio: Sequence[Audio]) -> List[str]:
        """recognize's texts."""
        return [h.text for h in self.recognize(audio)]

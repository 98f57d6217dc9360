"""The recipe's fbank in numpy, without torch: what features.compute_fbank returns as a
tensor, and what the ONNX Runtime transcriber (cifhkd.onnx_asr) computes its features
with. kaldi-native-fbank (Kaldi's compute-fbank-feats: 25 ms Povey window, 10 ms shift,
pre-emphasis 0.97, snip_edges), no dither; samples are scaled to the 16-bit range first,
as Kaldi reads wav files.
"""

import numpy as np

import kaldi_native_fbank as knf

SAMPLE_RATE = 16000


def compute_fbank(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80, dither: float = 0.0
) -> np.ndarray:
    """Log-mel filterbank of one utterance: samples [num_samples] float in [-1, 1] ->
    [T, num_mel_bins] float32, T = 1 + (num_samples - 400) // 160 at 16 kHz (0 frames
    when the utterance is shorter than one 25 ms window)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"compute_fbank: samples must be 1-D [num_samples], got shape {samples.shape}")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = dither
    opts.mel_opts.num_bins = num_mel_bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(sample_rate, (samples * 32768.0).tolist())
    fbank.input_finished()
    num_frames = fbank.num_frames_ready
    if num_frames == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return np.stack([fbank.get_frame(i) for i in range(num_frames)]).astype(np.float32, copy=False)


def num_fbank_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """compute_fbank's frame count for num_samples samples (25 ms windows, 10 ms shift,
    snip_edges): 1 + (num_samples - 400) // 160 at 16 kHz, 0 below one window."""
    window, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def utterance_cmvn(feats: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per-utterance mean and variance normalisation of [T, F] float32 features, per bin
    (features.utterance_cmvn in numpy: equal to within float32 rounding)."""
    mean = feats.mean(axis=0, keepdims=True)
    std = feats.std(axis=0, keepdims=True)
    return ((feats - mean) / (std + np.float32(eps))).astype(np.float32, copy=False)

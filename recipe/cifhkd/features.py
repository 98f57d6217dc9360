"""Acoustic front end of the CIF-HKD recipe: Kaldi fbank, utterance CMVN, SpecAugment.

    samples = speed_perturb(samples, 1.1)     # training only (optional)
    feats = compute_fbank(samples)            # [T, 80] float32, 10 ms frames
    feats = utterance_cmvn(feats)             # zero mean, unit variance per bin
    feats = SpecAugment()(feats)              # training only; 2 freq masks F=27, 2 time masks T=50

compute_fbank is cifhkd.fbank's (kaldi-native-fbank, Kaldi's compute-fbank-feats: 25 ms
Povey window, 10 ms shift, pre-emphasis 0.97, snip_edges) with no dither, so features
are deterministic; that module is numpy only, for the ONNX Runtime transcriber.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import fbank
from .fbank import SAMPLE_RATE, num_fbank_frames  # noqa: F401 (this module's API)


def compute_fbank(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80, dither: float = 0.0
) -> Tensor:
    """Log-mel filterbank of one utterance (fbank.compute_fbank, as a tensor).

    Args:
        samples: [num_samples] float waveform in [-1, 1] (data.load_audio's output).
        sample_rate: its rate in Hz.
        num_mel_bins: number of mel bins (80 in the recipe).
        dither: Kaldi's dither (0: deterministic).

    Returns:
        [T, num_mel_bins] float32, T = 1 + (num_samples - 400) // 160 at 16 kHz
        (0 frames when the utterance is shorter than one 25 ms window).
    """
    return torch.from_numpy(fbank.compute_fbank(samples, sample_rate, num_mel_bins, dither))


def speed_perturb(samples: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi's speed perturbation (sox ``speed``): play the waveform factor times faster,
    which shortens it by 1/factor and raises every frequency, pitch and formants alike,
    by factor. Done by resampling with soxr (the maintained libsoxr binding) as if the
    samples had been recorded at factor * sample_rate."""
    if factor <= 0:
        raise ValueError(f"speed_perturb: factor must be positive, got {factor}")
    samples = np.asarray(samples, dtype=np.float32)
    if factor == 1.0:
        return samples
    import soxr

    return soxr.resample(samples, factor * sample_rate, sample_rate).astype(np.float32)


def utterance_cmvn(feats: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance mean and variance normalisation of [T, F] features, per bin."""
    mean = feats.mean(dim=0, keepdim=True)
    std = feats.std(dim=0, unbiased=False, keepdim=True)
    return (feats - mean) / (std + eps)


@dataclass
class SpecAugmentConfig:
    """SpecAugment without time warp (the recipe's setting).

    num_freq_masks masks of width uniform in [0, freq_mask_width] mel bins, and
    num_time_masks masks of width uniform in [0, min(time_mask_width,
    max_time_ratio * T)] frames; masked values are set to mask_value (0 = the mean
    after utterance CMVN).
    """

    num_freq_masks: int = 2
    freq_mask_width: int = 27
    num_time_masks: int = 2
    time_mask_width: int = 50
    max_time_ratio: float = 0.2
    mask_value: float = 0.0

    def __post_init__(self):
        for name in ("num_freq_masks", "freq_mask_width", "num_time_masks", "time_mask_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"SpecAugmentConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_time_ratio <= 1.0:
            raise ValueError(f"SpecAugmentConfig: max_time_ratio must be in [0, 1], got {self.max_time_ratio}")


class SpecAugment(torch.nn.Module):
    """Frequency and time masking of one utterance's [T, F] features (a copy is returned).

    Pass a torch.Generator for reproducible masks.
    """

    def __init__(self, config: Optional[SpecAugmentConfig] = None):
        super().__init__()
        self.config = config or SpecAugmentConfig()

    def forward(self, feats: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if feats.dim() != 2:
            raise ValueError(f"SpecAugment: feats must be [T, F], got shape {tuple(feats.shape)}")
        c = self.config
        feats = feats.clone()
        num_frames, num_bins = feats.shape

        def randint(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(0, high + 1, (1,), generator=generator))

        for _ in range(c.num_freq_masks):
            width = randint(min(c.freq_mask_width, num_bins))
            start = randint(num_bins - width)
            feats[:, start : start + width] = c.mask_value
        max_time = min(c.time_mask_width, int(c.max_time_ratio * num_frames))
        for _ in range(c.num_time_masks):
            width = randint(max_time)
            start = randint(num_frames - width)
            feats[start : start + width, :] = c.mask_value
        return feats

    def extra_repr(self) -> str:
        return repr(self.config)

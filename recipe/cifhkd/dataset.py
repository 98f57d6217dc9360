"""Utterances -> dataset items: features, ASR token ids and cached teacher states.

    utts, report = data.read_manifest("data/demo/train")
    utts, report = data.check_audio(utts, report=report)
    states = teacher_cache.load_states("exp/teacher", "data/demo/train")
    dataset = AsrDataset(utts, vocab, tokenizer, teacher_states=states,
                         spec_augment=features.SpecAugment())
    sampler = sampler_lib.BucketBatchSampler([u.duration for u in utts], max_batch_seconds=120)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=batch.collate)

Token ids are computed once, at construction (an AlignmentError names the utterance's
manifest line). Teacher states come from extract_teacher.py's cache
(teacher_cache.load_states); an utterance missing from them, or whose state count differs
from its tokens + [SEP], is an error.
train.too_short lists the utterances whose audio gives the model fewer encoder frames
than their transcripts need (min_encoder_frames: CTC's alignment); dataset.drop removes
them. A data-loader worker imports this module and cifhkd.batch, never the model or
cifops.
"""

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from . import data
from . import features
from . import teacher as teacher_lib


class AsrDataset(torch.utils.data.Dataset):
    """Item i: {"id", "feats" [T, 80] (CMVN, SpecAugment when given), "tokens" [L],
    "teacher" [L+1, Dt] or None}.

    speed_perturb: speed factors (Kaldi/sox ``speed``: 1.1 is 10% faster and higher, as
    if the voice were another speaker's); each item draws one uniformly. The factor and
    the SpecAugment masks are seeded by (seed, epoch, i)."""

    def __init__(
        self,
        utterances: Sequence[data.Utterance],
        vocab: teacher_lib.TokenVocab,
        tokenizer,
        teacher_states: Optional[Dict[str, Tensor]] = None,
        spec_augment: Optional[features.SpecAugment] = None,
        seed: int = 0,
        speed_perturb: Sequence[float] = (),
    ):
        if any(not 0.5 <= f <= 2.0 for f in speed_perturb):
            raise ValueError(f"speed_perturb factors must be in [0.5, 2], got {list(speed_perturb)}")
        self.speed_perturb = [float(f) for f in speed_perturb]
        self.utterances = list(utterances)
        self.tokens = []
        for utt in self.utterances:
            try:
                self.tokens.append(torch.tensor(vocab.encode(tokenizer, utt.text), dtype=torch.long))
            except teacher_lib.AlignmentError as e:
                raise teacher_lib.AlignmentError(f"{utt.source}: {utt.id}: {e}") from None
            if teacher_states is not None:
                states = teacher_states.get(utt.id)
                if states is None:
                    raise KeyError(f"{utt.source}: {utt.id} is not in the teacher cache")
                if states.shape[0] != len(self.tokens[-1]) + 1:
                    raise ValueError(
                        f"{utt.source}: {utt.id}: {states.shape[0]} cached teacher "
                        f"states for {len(self.tokens[-1])} tokens + [SEP]; "
                        "re-run extract_teacher.py"
                    )
        self.teacher_states = teacher_states
        self.spec_augment = spec_augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        try:
            samples = data.load_audio(utt.audio)
        except data.ManifestError as e:
            raise data.ManifestError(f"{utt.source}: {utt.id}: {e}") from None
        if self.speed_perturb:
            factor = self.speed_perturb[int(torch.randint(len(self.speed_perturb), (1,), generator=generator))]
            samples = features.speed_perturb(samples, factor)
        feats = features.utterance_cmvn(features.compute_fbank(samples))
        if self.spec_augment is not None:
            feats = self.spec_augment(feats, generator=generator)
        teacher = None if self.teacher_states is None else self.teacher_states[utt.id].float()
        return {"id": utt.id, "feats": feats, "tokens": self.tokens[index], "teacher": teacher}

    def drop(self, indices: Sequence[int]):
        """Remove these utterances (indices into the current list)."""
        gone = set(indices)
        keep = [i for i in range(len(self.utterances)) if i not in gone]
        self.utterances = [self.utterances[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]


def min_encoder_frames(tokens: Tensor, ctc: bool) -> int:
    """Encoder frames an utterance of these L tokens needs: with a CTC term, one per token
    and a blank between equal neighbours (fewer make the CTC loss infinite, which
    zero_infinity turns into a silent 0); CIF, whose target_lengths scaling fires any count
    from any frames, needs one."""
    if not ctc:
        return 1
    repeats = int((tokens[1:] == tokens[:-1]).sum()) if len(tokens) > 1 else 0
    return max(1, len(tokens) + repeats)

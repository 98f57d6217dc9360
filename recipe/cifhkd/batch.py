"""The training batch: padded features, tokens and teacher states, and what depends on the
token counts, prepared on the host (prepare_batch; collate pads dataset items into one).

A data-loader worker runs collate: this module imports torch and cifhkd.teacher (for
the vocabulary's padding id and the teacher rows), never the model or cifops.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import teacher as teacher_lib


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> [B, max_len] bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


@dataclass
class Batch:
    """A training batch. feats [B, T, F] float; feat_lens [B]; tokens [B, L] ASR ids
    (without [SEP]; padding anything); token_lens [B]; teacher [B, L+1, Dt] and
    teacher_lens [B] (= token_lens + 1) only when ACD or LRD is on.

    The other fields are what depends on the token counts, decided on the host by
    prepare_batch (collate calls it), so that compute_loss reads nothing back
    from the device (each would be a synchronisation on CUDA):

        max_tokens    N >= max(token_lens) + 1: the CIF width, a static shape
        ctc_targets   [sum L] every utterance's tokens, concatenated (CTC's targets)
        token_index   [sum(L+1)] the flat positions b * N + i (i <= L_b) of the tokens
                      and [SEP]s in a [B, N] grid: the rows of ACD and LRD
        teacher_rows  [sum(L+1), Dt] the teacher states of those positions (with teacher)
        host_lens     [2, B] int64 on the CPU: feat_lens and token_lens for the CTC loss,
                      which reads its lengths on the host; never moved to a device
    """

    feats: Tensor
    feat_lens: Tensor
    tokens: Tensor
    token_lens: Tensor
    teacher: Optional[Tensor] = None
    teacher_lens: Optional[Tensor] = None
    max_tokens: Optional[int] = None
    ctc_targets: Optional[Tensor] = None
    token_index: Optional[Tensor] = None
    teacher_rows: Optional[Tensor] = None
    host_lens: Optional[Tensor] = None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        """fn applied to every tensor but host_lens."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, Tensor) and k != "host_lens" else v for k, v in values.items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on `device` (host_lens stays on the CPU)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, for non-blocking copies to CUDA (DataLoader's pin_memory
        calls this)."""
        return self._map(Tensor.pin_memory)


def prepare_batch(batch: Batch, token_multiple: int = 1) -> Batch:
    """The batch with max_tokens, ctc_targets, token_index, teacher_rows and host_lens
    filled in from its lengths (see Batch). On the CPU (as collate calls it) this
    costs no synchronisation; on a device, the lengths are read back once.

    token_multiple: round max_tokens up to a multiple of this (fewer distinct shapes for
    torch.compile; the extra positions are padding, masked everywhere). Raises
    ValueError when teacher_lens is not token_lens + 1."""
    token_lens, feat_lens = batch.token_lens.cpu(), batch.feat_lens.cpu()
    device = batch.tokens.device
    n = int(token_lens.max()) + 1 if len(token_lens) else 1
    n = -(-n // token_multiple) * token_multiple
    b = batch.tokens.shape[0]
    rows = lengths_to_mask(token_lens + 1, n)  # [B, N] on the host
    token_index = rows.flatten().nonzero().squeeze(1)
    tokens = batch.tokens[:, : n - 1]
    ctc_targets = tokens[lengths_to_mask(token_lens, tokens.shape[1]).to(device)]
    teacher_rows = None
    if batch.teacher is not None:
        if batch.teacher_lens is None:
            raise ValueError("prepare_batch: the batch has teacher states but no teacher_lens")
        teacher_lens = batch.teacher_lens.cpu()
        if not torch.equal(teacher_lens, token_lens + 1):
            bad = int(torch.nonzero(teacher_lens != token_lens + 1)[0])
            raise ValueError(
                f"prepare_batch: utterance {bad} has {int(teacher_lens[bad])} "
                f"teacher states for {int(token_lens[bad])} tokens + [SEP]; "
                "the teacher cache does not match the vocabulary/transcripts"
            )
        teacher = batch.teacher[:, :n]
        if teacher.shape[1] < n:
            teacher = F.pad(teacher, (0, 0, 0, n - teacher.shape[1]))
        teacher_rows = teacher.reshape(b * n, -1).index_select(0, token_index.to(teacher.device))
    return dataclasses.replace(
        batch,
        max_tokens=n,
        ctc_targets=ctc_targets,
        token_index=token_index.to(device),
        teacher_rows=teacher_rows,
        host_lens=torch.stack([feat_lens, token_lens]).long(),
    )


def collate(items: List[dict], token_multiple: int = 1) -> Batch:
    """Pad a list of AsrDataset items (dataset.AsrDataset) into a Batch (zeros as padding), prepared on
    the host (prepare_batch: the CIF width, CTC targets, token rows and teacher rows;
    a teacher state count that is not the tokens + [SEP] is a ValueError here).
    token_multiple: see prepare_batch."""
    pad = torch.nn.utils.rnn.pad_sequence
    feats = pad([it["feats"] for it in items], batch_first=True)
    feat_lens = torch.tensor([it["feats"].shape[0] for it in items])
    tokens = pad([it["tokens"] for it in items], batch_first=True, padding_value=teacher_lib.TokenVocab.BLANK)
    token_lens = torch.tensor([len(it["tokens"]) for it in items])
    teacher = teacher_lens = None
    if all(it["teacher"] is not None for it in items):
        teacher, teacher_lens = teacher_lib.pad_teacher_states([it["teacher"] for it in items])
    return prepare_batch(Batch(feats, feat_lens, tokens, token_lens, teacher, teacher_lens), token_multiple)

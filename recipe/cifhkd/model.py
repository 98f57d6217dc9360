"""CIF-HKD: a CIF-based recognizer with hierarchical knowledge distillation from a PLM.

Shapes (B utterances, T fbank frames, T' = ~T/8 encoder frames, L transcript tokens,
N = L + 1 CIF tokens including the end-of-sentence token [SEP], V ASR vocabulary,
D d_model, Dt the teacher's width):

    feats [B, T, 80] -> Conv2d subsampling (2x) + Conformer layers with MaxPool(2) after
        two of them (8x in all)                               -> enc [B, T', D]
    enc -> CifWeightPredictor                                  -> alphas [B, T'] in (0, 1)
    cifops.cif(enc, alphas, target_lengths=L+1)  (training)    -> c [B, N, D]
    cifops.cif(enc, alphas, tail_threshold=0.45) (inference)
    decoder: x_i = Linear([embed(y_{i-1}); c_{i-1}]) (y_{-1} = [SEP], c_{-1} = 0),
        causal self-attention layers (no cross-attention)     -> s [B, N, D]
        h_i = Linear([s_i; c_i])                                -> h [B, N, D]
        logits_i = Linear(h_i)                                  -> [B, N, V]
    CTC head on enc                                             -> [B, T', V]
    ACD: Linear(c_i) -> Dt vs the teacher's e_i, InfoNCE over every token of the batch
         and, with acd_bank > 0, that many cached teacher rows of the training split as
         extra negatives (TeacherBank) (cifops.contrastive_loss, tau 0.02)
    LRD: Linear(h_i) -> Dt regressed onto e_i (MSE, summed)

compute_loss returns the weighted sum of

    ce        cross-entropy with label smoothing 0.1 over the N tokens   (weight 1.0)
    quantity  |sum(alphas) - (L+1)|                                     (weight 1.0)
    ctc       CTC on the L tokens                                       (weight 0.5)
    acd       acoustic contrastive distillation                         (weight 1.0)
    lrd       linguistic regression distillation                        (weight 0.01)

all summed over tokens (the trainer divides by the token count). A weight of 0 removes
its term and its computation (no CTC head, no projection, no teacher needed).

What depends on the token counts (the CIF width, the CTC targets, the token and teacher
rows) is decided on the host by batch.prepare_batch, which batch.collate calls: compute_loss
then reads nothing back from the device and torch.compile traces it whole.

ModelConfig() is a small configuration for the CPU demo; aishell1_config() is the
paper's released AISHELL-1 configuration (about 47 M parameters with a 4k vocabulary).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cifops
from . import batch as batch_lib
from .batch import lengths_to_mask

BLANK_ID = 0  # CTC blank and padding (teacher.TokenVocab.BLANK)
EOS_ID = 1  # end of sentence, the teacher's [SEP]; also the decoder's start symbol
IGNORE = -100  # ignored target


@dataclass
class ModelConfig:
    """Model sizes and loss weights. Defaults: the CPU demo (about 5 M parameters plus
    2 x vocab x d_model for the embeddings and output layers)."""

    vocab_size: int = 0  # ASR vocabulary incl. blank, [SEP], [UNK]
    teacher_dim: int = 384  # PLM width (all-MiniLM-L6-v2: 384; BERT-base: 768)
    num_mel_bins: int = 80
    # encoder
    d_model: int = 144
    num_heads: int = 4
    ffn_dim: int = 576
    num_layers: int = 6
    pool_after: Tuple[int, ...] = (2, 4)  # MaxPool(2) after these layers (1-based)
    conv_kernel: int = 15
    subsampling_channels: int = 64
    # LayerNorm at the end of every Conformer block (Gulati et al.; the released
    # configuration). Off in the demo: it pins the scale of the encoder output, so the CTC
    # and CIF heads can only sharpen as fast as Adam grows their weights (about lr per
    # step), which kept a from-scratch model on the unigram plateau for thousands of
    # updates (docs/hkd-recipe.md, "Why the demo model has no block-final LayerNorm").
    block_final_norm: bool = False
    dropout: float = 0.1
    # CIF
    cif_dropout: float = 0.2
    cif_threshold: float = 1.0
    tail_threshold: float = 0.45
    # decoder
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_ffn_dim: int = 576
    # losses
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    quantity_weight: float = 1.0
    ctc_weight: float = 0.5
    acd_weight: float = 1.0
    acd_temperature: float = 0.02
    # ACD's extra negatives: teacher rows drawn at each step from the training split's
    # cached teacher states (TeacherBank; train.py builds it); 0: the batch's rows only
    acd_bank: int = 0
    lrd_weight: float = 0.01

    def __post_init__(self):
        if self.d_model % self.num_heads or self.d_model % self.decoder_heads:
            raise ValueError("ModelConfig: d_model must be divisible by num_heads and decoder_heads")
        if self.acd_bank < 0:
            raise ValueError(f"ModelConfig: acd_bank must be >= 0, got {self.acd_bank}")
        if any(not 1 <= p <= self.num_layers for p in self.pool_after):
            raise ValueError(f"ModelConfig: pool_after {self.pool_after} must name layers 1..{self.num_layers}")


def aishell1_config(vocab_size: int = 4233, teacher_dim: int = 768) -> ModelConfig:
    """The paper's AISHELL-1 configuration (15 Conformer layers, d 256, FFN 2048, 4 heads,
    kernel 15, pooling after layers 5 and 10, 2 decoder layers; teacher bert-base-chinese)."""
    return ModelConfig(
        vocab_size=vocab_size,
        teacher_dim=teacher_dim,
        d_model=256,
        num_heads=4,
        ffn_dim=2048,
        num_layers=15,
        pool_after=(5, 10),
        conv_kernel=15,
        subsampling_channels=256,
        dropout=0.1,
        decoder_layers=2,
        decoder_heads=4,
        decoder_ffn_dim=2048,
        block_final_norm=True,
    )


class Dropout(nn.Module):
    """nn.Dropout with a cheaper random mask on CPU (CUDA and eval behave as nn.Dropout).

    torch's CPU dropout draws one mt19937 double per element through a serial loop
    (bernoulli_; MKL's vectorised generator is used on Intel CPUs only): 9 ms forward
    for a [13, 150, 576] activation on the 2-core AMD EPYC of the demo, 11-13% of a demo
    training step. This mask takes four 16-bit uniform draws from each 64-bit mt19937
    word and turns them into 0 / 1/(1-p) with float arithmetic: 2 ms. An element is
    dropped with probability round(65536 p) / 65536 (p to within 1e-5) and kept ones are
    scaled by the exact inverse of the keep probability, so the expectation is unchanged.
    Draws come from torch's default CPU generator, so torch.manual_seed and the
    trainer's saved RNG state reproduce the masks. Under torch.compile it is F.dropout
    (the compiled graph draws its own masks).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)  # torch.compile draws its own masks
        return x * dropout_mask(x.shape, self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_mask(shape, p: float) -> Tensor:
    """float32 CPU tensor of `shape`: 0 with probability round(65536 p) / 65536, else
    1 / (1 - that probability); independent elements (Dropout's mask)."""
    n = math.prod(shape)
    dropped = round(p * 65536)  # of the 65536 values of a draw
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    draws = words.view(torch.int16)[:n].to(torch.float32)  # uniform in [-32768, 32767]
    # keep draw >= -32768 + dropped: draw - (-32768 + dropped - 1) is >= 1 exactly then
    keep = draws.sub_(dropped - 32769).clamp_(0.0, 1.0)
    return keep.mul_(65536 / (65536 - dropped)).view(shape)


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """Transformer sinusoidal encodings of float positions [P] -> [P, dim]."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    out = torch.zeros(positions.shape[0], dim, device=positions.device)
    out[:, 0::2] = torch.sin(angles)
    out[:, 1::2] = torch.cos(angles)
    return out


# --- encoder -------------------------------------------------------------------------


class Conv2dSubsampling(nn.Module):
    """[B, T, F] -> [B, ceil(T/2), D]: Conv2d(k3, stride 2) + ReLU + Linear."""

    def __init__(self, num_mel_bins: int, channels: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)
        self.out = nn.Linear(channels * ((num_mel_bins + 1) // 2), d_model)

    def forward(self, feats: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu(self.conv(feats.unsqueeze(1)))  # [B, C, T2, F2]
        b, c, t, f = x.shape
        x = self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        return x, (lengths + 1) // 2


class RelPositionMultiheadAttention(nn.Module):
    """Self-attention with Transformer-XL relative positions (the Conformer's):
    score(i, j) = (q_i + u) . k_j + (q_i + v) . W p_{i-j}, p sinusoidal."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.pos = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = Dropout(dropout)

    @staticmethod
    def rel_shift(scores: Tensor) -> Tensor:
        """[B, H, T, 2T-1] scores against relative positions T-1, ..., -(T-1) ->
        [B, H, T, T] with out[..., i, j] = scores[..., i, T-1-(i-j)]."""
        b, h, t, n = scores.shape
        padded = torch.cat([scores.new_zeros(b, h, t, 1), scores], dim=-1).view(b, h, n + 1, t)
        return padded[:, :, 1:].reshape(b, h, t, n)[..., :t]

    def forward(self, x: Tensor, pos_emb: Tensor, padding_mask: Tensor) -> Tensor:
        """x [B, T, D]; pos_emb [2T-1, D]; padding_mask [B, T] True at padding."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, dh]
        p = self.pos(pos_emb).view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # [H, 2T-1, dh]
        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
        position = self.rel_shift((q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = self.dropout(torch.softmax(scores, dim=-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, ffn_dim),
            nn.SiLU(),
            Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
            Dropout(dropout),
        )


class ConvModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise (kernel k), norm, SiLU, pointwise.
    LayerNorm instead of BatchNorm, so padding and batch composition never enter the
    statistics (the demo trains with small, variable batches)."""

    def __init__(self, d_model: int, kernel: int, dropout: float):
        super().__init__()
        self.norm_in = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        x = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1)
        x = x.masked_fill(padding_mask[..., None], 0.0)  # padding must not leak in
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(F.silu(self.norm(x))))


class ConformerLayer(nn.Module):
    """Macaron FFN/2, relative-position MHSA, convolution, FFN/2, LayerNorm (when
    final_norm; otherwise the pre-norm residual stream is the output)."""

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, kernel: int, dropout: float, final_norm: bool = True
    ):
        super().__init__()
        self.ffn1 = FeedForward(d_model, ffn_dim, dropout)
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = RelPositionMultiheadAttention(d_model, num_heads, dropout)
        self.dropout = Dropout(dropout)
        self.conv = ConvModule(d_model, kernel, dropout)
        self.ffn2 = FeedForward(d_model, ffn_dim, dropout)
        self.norm_out = nn.LayerNorm(d_model) if final_norm else nn.Identity()

    def forward(self, x: Tensor, pos_emb: Tensor, padding_mask: Tensor) -> Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.dropout(self.attn(self.norm_attn(x), pos_emb, padding_mask))
        x = x + self.conv(x, padding_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """fbank [B, T, F] + lengths -> ([B, T', D], lengths [B]); T' = ceil(T/2) halved
    (ceil) at each pooling layer: 8x with two poolings."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.subsampling = Conv2dSubsampling(c.num_mel_bins, c.subsampling_channels, c.d_model)
        self.layers = nn.ModuleList(
            ConformerLayer(c.d_model, c.num_heads, c.ffn_dim, c.conv_kernel, c.dropout, c.block_final_norm)
            for _ in range(c.num_layers)
        )
        self.pool_after = set(c.pool_after)
        self.dropout = Dropout(c.dropout)
        self.d_model = c.d_model

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """The lengths forward returns for input lengths (on any device: the CTC loss
        takes them from the host's copy)."""
        for _ in range(1 + len(self.pool_after)):
            lengths = (lengths + 1) // 2
        return lengths

    def forward(self, feats: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(feats, lengths)
        x = self.dropout(x)
        for index, layer in enumerate(self.layers, 1):
            t = x.shape[1]
            padding_mask = ~lengths_to_mask(lengths, t)
            pos_emb = sinusoids(torch.arange(t - 1, -t, -1, device=x.device), self.d_model).to(x.dtype)
            x = layer(x, pos_emb, padding_mask)
            if index in self.pool_after:
                # padding may not win a max: fill it with the lowest value first. Then the
                # max of each pair of frames, a last odd frame paired with the lowest value:
                # max_pool1d(2, ceil_mode=True), without its branches on the length, which
                # torch.export would specialise (cifhkd.export)
                lowest = torch.finfo(x.dtype).min
                x = F.pad(x.masked_fill(padding_mask[..., None], lowest), (0, 0, 0, 1), value=lowest)
                pairs = (t + 1) // 2
                x = x[:, : 2 * pairs].reshape(x.shape[0], pairs, 2, x.shape[2]).amax(dim=2)
                lengths = (lengths + 1) // 2
                x = x.masked_fill(~lengths_to_mask(lengths, x.shape[1])[..., None], 0.0)
        x = x.masked_fill(~lengths_to_mask(lengths, x.shape[1])[..., None], 0.0)
        return x, lengths


def encoder_length(num_frames: int, config: ModelConfig) -> int:
    """ConformerEncoder's output length for num_frames fbank frames: ceil(T/2), halved
    (ceil) again after each pooling layer."""
    length = (num_frames + 1) // 2
    for _ in set(config.pool_after):  # as ConformerEncoder: a layer pools once
        length = (length + 1) // 2
    return length


# --- CIF and decoder ---------------------------------------------------------------------


class CifWeightPredictor(nn.Module):
    """enc [B, T', D] -> alphas [B, T'] in (0, 1), 0 at padding:
    Conv1d(D, D, 3) -> ReLU -> dropout -> Linear(D, 1) -> sigmoid. (The ReLU keeps the
    conv and the linear from collapsing into a single linear map.)"""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.dropout = Dropout(dropout)
        self.proj = nn.Linear(d_model, 1)

    def forward(self, enc: Tensor, lengths: Tensor) -> Tensor:
        x = F.relu(self.conv(enc.transpose(1, 2))).transpose(1, 2)
        alphas = torch.sigmoid(self.proj(self.dropout(x))).squeeze(-1)
        return alphas * lengths_to_mask(lengths, enc.shape[1])


class CifDecoder(nn.Module):
    """Autoregressive decoder over CIF tokens without cross-attention (see module doc).

    forward(prev_tokens [B, N], cif [B, N, D], token_mask [B, N]) -> (logits [B, N, V],
    h [B, N, D]); h is the state just before the vocabulary projection (LRD's student).
    """

    def __init__(self, c: ModelConfig):
        super().__init__()
        d = c.d_model
        self.embed = nn.Embedding(c.vocab_size, d)
        self.input_proj = nn.Linear(2 * d, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, c.decoder_heads, c.decoder_ffn_dim, c.dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(c.decoder_layers)
        )
        for layer in self.layers:  # the cheaper CPU mask (the attention's own dropout stays)
            layer.dropout, layer.dropout1, layer.dropout2 = (Dropout(c.dropout) for _ in range(3))
        self.norm = nn.LayerNorm(d)
        self.output_proj = nn.Linear(2 * d, d)
        self.vocab_proj = nn.Linear(d, c.vocab_size)
        self.dropout = Dropout(c.dropout)

    def forward(self, prev_tokens: Tensor, cif: Tensor, token_mask: Tensor) -> Tuple[Tensor, Tensor]:
        b, n, d = cif.shape
        cif_prev = torch.cat([cif.new_zeros(b, 1, d), cif[:, :-1]], dim=1)
        x = self.input_proj(torch.cat([self.embed(prev_tokens), cif_prev], dim=-1))
        x = self.dropout(x + sinusoids(torch.arange(n, device=cif.device), d).to(x.dtype))
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=cif.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=causal, src_key_padding_mask=~token_mask, is_causal=True)
        h = self.output_proj(torch.cat([self.norm(x), cif], dim=-1))
        return self.vocab_proj(h), h

    def step(
        self,
        prev_token: Tensor,
        cif_prev: Tensor,
        cif_cur: Tensor,
        position: int,
        cache: Optional[List[Tuple[Tensor, Tensor]]] = None,
    ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """One decoding step with cached keys and values (inference only: no dropout).

        prev_token [R] (y_{i-1}, [SEP] at i = 0), cif_prev [R, D] (c_{i-1}, zeros at
        i = 0), cif_cur [R, D] (c_i), position i; cache: what the previous step returned
        (None at i = 0), per layer (keys, values) [R, H, i, D/H]. Returns (logits [R, V]
        of token i, the cache extended by position i). The logits equal
        forward(...)[0][:, i] for the same inputs (tested); a step costs O(i), not the
        O(i^2) of running forward on the whole prefix. Reorder beams with
        ``[(k[idx], v[idx]) for k, v in cache]``."""
        if self.training:
            raise RuntimeError("CifDecoder.step is for inference: call model.eval() first")
        d = cif_cur.shape[-1]
        x = self.input_proj(torch.cat([self.embed(prev_token), cif_prev], dim=-1))
        x = x + sinusoids(torch.tensor([position], device=x.device), d).to(x.dtype)
        new_cache = []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads = attn.num_heads
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.view(-1, heads, 1, d // heads) for t in (q, k, v))
            if cache is not None:
                k = torch.cat([cache[index][0], k], dim=2)
                v = torch.cat([cache[index][1], v], dim=2)
            new_cache.append((k, v))
            a = F.scaled_dot_product_attention(q, k, v)  # every cached key is a past position
            x = x + attn.out_proj(a.reshape(-1, d))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        h = self.output_proj(torch.cat([self.norm(x), cif_cur], dim=-1))
        return self.vocab_proj(h), new_cache


# --- the model -----------------------------------------------------------------------------

# rank-local teacher rows [n, Dt] -> (all ranks' rows [M, Dt], offset of the local rows)
GatherTeacher = Callable[[Tensor], Tuple[Tensor, int]]


def teacher_row_keys(rows: Tensor) -> Tensor:
    """One int64 key per teacher row [n, Dt]: a fixed random linear hash of the row's
    float16 bits (the teacher cache's precision), so rows equal in float16 have equal keys
    whatever dtype they come in."""
    weights = torch.randint(1, 2**40, (rows.shape[-1],), generator=torch.Generator().manual_seed(20230130)).to(
        rows.device
    )
    rows = rows.detach().to(torch.float16).view(torch.int16)
    return torch.cat(
        [(chunk.long() * weights).sum(-1) for chunk in rows.split(8192)]
        or [torch.zeros(0, dtype=torch.long, device=rows.device)]
    )


class TeacherBank:
    """ACD's negatives beyond the batch (a GatherTeacher): the batch's teacher rows (every
    rank's, through `gather` when given) followed by `size` rows drawn, without
    replacement, from `rows`, the distinct teacher rows of the training split. The teacher
    is frozen, so the cached rows are exactly what it would compute now; each step then
    contrasts its student rows with n + size teacher rows at O((n + size) Dt) memory
    (cifops.contrastive_loss takes them as the extra negatives of targets' rows).

    A drawn row never equals one of the batch's own rows (a clause spoken twice has the
    same teacher rows: its copy would be a negative identical to the positive). The draw
    is a function of the seed and the batch's rows, so a resumed training draws what the
    uninterrupted one drew, with no state to save.

    TeacherBank.from_states(states, size, seed, device) builds it from the cache's
    {utt_id: [L+1, Dt]} states (identical rows kept once); `sources` names each row's
    (utterance, position)."""

    def __init__(
        self,
        rows: Tensor,
        size: int,
        seed: int = 0,
        gather: Optional[GatherTeacher] = None,
        sources: Optional[List[Tuple[str, int]]] = None,
    ):
        if size < 1:
            raise ValueError(f"TeacherBank: size must be >= 1, got {size}")
        keys = teacher_row_keys(rows)
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError("TeacherBank: rows must be distinct (from_states removes repeats)")
        if size >= rows.shape[0]:
            raise ValueError(
                f"TeacherBank: size {size} must be below the {rows.shape[0]} distinct "
                "teacher rows of the training split (lower --acd-bank)"
            )
        self.rows, self.keys, self.size, self.seed = rows, keys, size, seed
        self.gather, self.sources = gather, sources

    @classmethod
    def from_states(
        cls, states: Dict[str, Tensor], size: int, seed: int = 0, device="cpu", gather: Optional[GatherTeacher] = None
    ) -> "TeacherBank":
        """The bank over every row of `states` (utterance id -> [L+1, Dt]; ids sorted, so
        the rows' order does not depend on the dict's), identical rows kept once."""
        ids = sorted(states)
        rows = torch.cat([states[i] for i in ids])
        sources = [(i, p) for i in ids for p in range(states[i].shape[0])]
        keys = teacher_row_keys(rows)
        first = {}
        for index, key in enumerate(keys.tolist()):
            first.setdefault(key, index)
        keep = sorted(first.values())
        return cls(rows[keep].to(device), size, seed, gather, [sources[k] for k in keep])

    def draw(self, local: Tensor) -> Tensor:
        """Indices into self.rows of the `size` rows drawn for a batch whose (all ranks')
        teacher rows are `local`."""
        local_keys = teacher_row_keys(local)
        seed = (self.seed * 1_000_003 + int(local_keys.sum())) % (2**63)
        generator = torch.Generator(device=self.rows.device).manual_seed(seed)
        candidates = torch.randperm(self.rows.shape[0], generator=generator, device=self.rows.device)[
            : self.size + local.shape[0]
        ]
        # at most one pool row per batch row is excluded: the pool's rows are distinct
        candidates = candidates[~torch.isin(self.keys[candidates], local_keys)]
        if candidates.shape[0] < self.size:
            raise ValueError(
                f"TeacherBank: {self.rows.shape[0]} distinct rows leave fewer than {self.size} "
                f"outside a batch of {local.shape[0]} rows (lower --acd-bank)"
            )
        return candidates[: self.size]

    def __call__(self, local: Tensor) -> Tuple[Tensor, int]:
        rows, offset = self.gather(local) if self.gather is not None else (local, 0)
        drawn = self.rows[self.draw(rows.detach())]
        return torch.cat([rows, drawn.to(rows.dtype)]), offset


def _ctc_forward(
    log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int
) -> Tuple[Tensor, Tensor]:
    """aten's CTC as F.ctc_loss(zero_infinity=True) calls it -> (loss [B], log-alpha)."""
    nll, log_alpha = torch.ops.aten._ctc_loss(
        log_probs, targets, input_lengths.tolist(), target_lengths.tolist(), blank, True
    )
    return nll, log_alpha


@torch.library.custom_op("cifhkd::ctc_loss", mutates_args=())
def _ctc_loss(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    nll, _ = _ctc_forward(log_probs, targets, input_lengths, target_lengths, blank)
    return torch.where(nll == float("inf"), torch.zeros((), dtype=nll.dtype, device=nll.device), nll)


@torch.library.custom_op("cifhkd::ctc_loss_backward", mutates_args=())
def _ctc_loss_backward(
    grad: Tensor, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int
) -> Tensor:
    # the forward again, for log-alpha (whose width is data-dependent, so it is no output)
    nll, log_alpha = _ctc_forward(log_probs, targets, input_lengths, target_lengths, blank)
    grad = torch.where(nll == float("inf"), torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
    return torch.ops.aten._ctc_loss_backward(
        grad, log_probs, targets, input_lengths.tolist(), target_lengths.tolist(), nll, log_alpha, blank, True
    ).contiguous()


@_ctc_loss.register_fake
def _(log_probs, targets, input_lengths, target_lengths, blank):
    return log_probs.new_empty(log_probs.shape[1:2])


@_ctc_loss_backward.register_fake
def _(grad, log_probs, targets, input_lengths, target_lengths, blank):
    return log_probs.new_empty(log_probs.shape)  # contiguous, as aten's


def _ctc_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.blank = inputs[4]


def _ctc_backward(ctx, grad):
    return torch.ops.cifhkd.ctc_loss_backward(grad, *ctx.saved_tensors, ctx.blank), None, None, None, None


_ctc_loss.register_autograd(_ctc_backward, setup_context=_ctc_setup_context)


def ctc_loss(
    log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int = BLANK_ID
) -> Tensor:
    """F.ctc_loss(..., reduction="none", zero_infinity=True) -> [B]. Lengths are read on
    the host: give them as CPU tensors, or CUDA synchronises. Under torch.compile it is
    the op cifhkd::ctc_loss, which the compiler takes as a whole (aten's CTC has no shape
    function: the width of its log-alpha depends on the data): the same kernels and
    numbers, its backward recomputing the forward."""
    if torch.compiler.is_compiling():
        return torch.ops.cifhkd.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank)
    return F.ctc_loss(
        log_probs, targets, input_lengths, target_lengths, blank=blank, reduction="none", zero_infinity=True
    )


class CifHkdModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 3:
            raise ValueError("ModelConfig.vocab_size must be set (blank, [SEP], [UNK] and pieces)")
        self.config = config
        d = config.d_model
        self.encoder = ConformerEncoder(config)
        self.cif_predictor = CifWeightPredictor(d, config.cif_dropout)
        self.decoder = CifDecoder(config)
        self.ctc_head = nn.Linear(d, config.vocab_size)
        self.acd_proj = nn.Linear(d, config.teacher_dim)
        self.lrd_proj = nn.Linear(d, config.teacher_dim)

    def encode(self, feats: Tensor, feat_lens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """-> (enc [B, T', D], enc_lens [B], alphas [B, T'])."""
        enc, enc_lens = self.encoder(feats, feat_lens)
        return enc, enc_lens, self.cif_predictor(enc, enc_lens)

    def ctc_log_probs(self, enc: Tensor) -> Tensor:
        """The CTC branch: enc [B, T, D] -> float32 log-probabilities [T, B, V] (ctc_loss's
        layout)."""
        return F.log_softmax(self.ctc_head(enc).float(), dim=-1).transpose(0, 1)

    def forward(
        self, batch: batch_lib.Batch, gather_teacher: Optional[GatherTeacher] = None
    ) -> Tuple[Tensor, Dict[str, Tensor], int]:
        """compute_loss (forward is what DistributedDataParallel wraps)."""
        return self.compute_loss(batch, gather_teacher)

    def compute_loss(
        self, batch: batch_lib.Batch, gather_teacher: Optional[GatherTeacher] = None
    ) -> Tuple[Tensor, Dict[str, Tensor], int]:
        """-> (weighted sum of the enabled terms, {name: detached term}, number of tokens
        the CE/ACD/LRD terms are summed over: sum(L+1)). Terms are sums, not means.

        Nothing is read back from the device when the batch was prepared on the host
        (batch.prepare_batch; batch.collate does it): the shapes that depend on the data come
        from there, masked rows are ignored through targets rather than selected, and
        torch.compile(fullgraph=True) can trace it. An unprepared batch is prepared here.

        gather_teacher: for data parallel training, maps this rank's teacher rows
        [n, Dt] to (the teacher rows of all ranks [M, Dt], the offset of this rank's rows
        in them); ACD then takes every rank's tokens as negatives. The gathered rows carry
        no gradient (the teacher is frozen); the student's stay local."""
        c = self.config
        if batch.max_tokens is None:
            batch = batch_lib.prepare_batch(batch)
        n, rows = batch.max_tokens, batch.token_index
        enc, enc_lens, alphas = self.encode(batch.feats, batch.feat_lens)
        num_targets = batch.token_lens + 1  # L + 1 with [SEP]
        out = cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, target_lengths=num_targets, max_tokens=n)
        cif = out.embeds  # [B, N, D]
        # CIF fires exactly L + 1 tokens with target_lengths, so this mask equals the host's
        # rows (token_index); should a token not fire, its rows are ignored below
        token_mask = lengths_to_mask(torch.minimum(out.token_lengths, num_targets), n)

        # targets p_1..p_L, [SEP], IGNORE beyond
        positions = torch.arange(n, device=cif.device)[None, :]
        tokens = batch.tokens[:, :n]
        if tokens.shape[1] < n:
            tokens = F.pad(tokens, (0, n - tokens.shape[1]), value=BLANK_ID)
        targets = torch.where(positions < batch.token_lens[:, None], tokens, torch.full_like(tokens, EOS_ID))
        targets = targets.masked_fill(~token_mask, IGNORE)

        terms: Dict[str, Tensor] = {}
        if c.quantity_weight > 0:
            terms["quantity"] = (out.alpha_sum - num_targets.to(out.alpha_sum.dtype)).abs().sum()
        if c.ctc_weight > 0:
            feat_lens, token_lens = batch.host_lens
            terms["ctc"] = ctc_loss(
                self.ctc_log_probs(enc), batch.ctc_targets, self.encoder.output_lengths(feat_lens), token_lens
            ).sum()
        h = None
        if c.ce_weight > 0 or c.lrd_weight > 0:
            prev = torch.cat([torch.full_like(targets[:, :1], EOS_ID), targets[:, :-1]], dim=1)
            prev = prev.masked_fill(prev == IGNORE, BLANK_ID)
            logits, h = self.decoder(prev, cif, token_mask)
            if c.ce_weight > 0:
                terms["ce"] = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    label_smoothing=c.label_smoothing,
                    reduction="sum",
                )
        if c.acd_weight > 0 or c.lrd_weight > 0:
            teacher = batch.teacher_rows  # [num_tokens, Dt]
            if teacher is None:
                raise ValueError("compute_loss: ACD/LRD are on but the batch has no teacher states")
            fired = token_mask.flatten().index_select(0, rows)  # all True (see token_mask)
            if c.acd_weight > 0:
                student = self.acd_proj(cif.flatten(0, 1).index_select(0, rows))
                negatives, offset = teacher, 0
                if gather_teacher is not None:
                    negatives, offset = gather_teacher(teacher)
                positives = offset + torch.arange(teacher.shape[0], device=teacher.device)
                # The op needs no cast (its autocast kernel promotes the two sides to their
                # common dtype); the teacher rows go down to the student's dtype on purpose,
                # so that a bfloat16 student under autocast runs the bfloat16 path: with the
                # cache's float16 rows, promotion would compute in float32.
                terms["acd"] = cifops.contrastive_loss(
                    student,
                    negatives.to(student.dtype),
                    positives.masked_fill(~fired, IGNORE),
                    temperature=c.acd_temperature,
                    normalize=True,
                    reduction="sum",
                    ignore_index=IGNORE,
                )
            if c.lrd_weight > 0:
                student = self.lrd_proj(h.flatten(0, 1).index_select(0, rows)).float()
                student = torch.where(fired[:, None], student, teacher.float())
                terms["lrd"] = F.mse_loss(student, teacher.float(), reduction="sum")

        weights = {
            "ce": c.ce_weight,
            "quantity": c.quantity_weight,
            "ctc": c.ctc_weight,
            "acd": c.acd_weight,
            "lrd": c.lrd_weight,
        }
        if not terms:
            raise ValueError("compute_loss: every loss weight is 0")
        loss = sum(weights[name] * value for name, value in terms.items())
        return loss, {name: value.detach() for name, value in terms.items()}, rows.shape[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

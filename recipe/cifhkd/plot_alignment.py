"""Draw one utterance's CIF alignment (PNG): the fbank, the CIF weights with the fire
positions, and the decoded tokens at the frames where they fire.

    python python/plot_alignment.py --checkpoint exp/hkd/averaged.pt --split data/demo/test \
        --out exp/hkd/alignment.png [--utt ID] [--method beam]

Top panel: the 80-dim log-mel fbank (after utterance CMVN) over time. Bottom panel: the
weight alpha_t of each encoder frame (bars, 80 ms per frame with 8x subsampling), the
running sum of alpha (line, right axis) and a vertical line where CIF fires, labelled with
the token the decoder emitted for it. Without --utt the split's first utterance is drawn.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from . import data
from . import decode as decode_lib
from . import features


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="train_hkd.py's averaged.pt or checkpoint-<step>.pt"
    )
    parser.add_argument("--split", type=Path, required=True, help="Kaldi dir or JSONL manifest")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--utt", default=None, help="utterance id (default: the first)")
    parser.add_argument("--method", choices=["greedy", "beam"], default="beam")
    parser.add_argument("--beam", type=int, default=decode_lib.BEAM)
    return parser


def plot(path: Path, title: str, feats, alphas, fire_frames, tokens, frame_period_s: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_a) = plt.subplots(
        2,
        1,
        figsize=(max(8.0, 1.2 * len(alphas) * frame_period_s + 2), 6),
        sharex=True,
        gridspec_kw={"height_ratios": [1.2, 1]},
    )
    duration = feats.shape[0] * decode_lib.FBANK_SHIFT_S
    ax_f.imshow(feats.T.numpy(), origin="lower", aspect="auto", cmap="viridis", extent=(0, duration, 0, feats.shape[1]))
    ax_f.set_ylabel("mel bin")
    ax_f.set_title(title, fontsize=9, loc="left")
    times = [(i + 0.5) * frame_period_s for i in range(len(alphas))]
    ax_a.bar(times, alphas.tolist(), width=0.8 * frame_period_s, color="tab:blue", label="alpha")
    ax_a.set_ylim(0, 1.05)
    ax_a.set_ylabel("CIF weight alpha")
    ax_a.set_xlabel("time (s)")
    ax_c = ax_a.twinx()
    ax_c.plot(times, torch.cumsum(alphas.double(), 0).tolist(), color="tab:orange", label="sum of alpha")
    ax_c.set_ylabel("sum of alpha", color="tab:orange")
    for frame, token in zip(fire_frames, tokens):
        t = (frame + 1) * frame_period_s
        ax_a.axvline(t, color="tab:red", linewidth=0.8)
        ax_a.text(t, 1.0, token, rotation=90, fontsize=8, ha="right", va="top", color="tab:red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class UnknownUtterance(LookupError):
    """--utt names no utterance of the split (main: exit status 2)."""


def plot_alignment(
    checkpoint: Union[str, Path],
    split: Union[str, Path],
    out: Union[str, Path],
    utt: Optional[str] = None,
    method: str = "beam",
    beam: int = decode_lib.BEAM,
) -> Path:
    """Draw utterance `utt` of the split (default: its first) as decoded by the checkpoint
    into the PNG file `out` (the module docstring; the arguments are the command line's
    options; paths as str or Path). -> out, a Path. UnknownUtterance when utt is not in
    the split."""
    checkpoint, split, out = Path(checkpoint), Path(split), Path(out)
    trained = decode_lib.load_checkpoint(checkpoint)
    model, vocab = trained.model, trained.vocab
    utts, _ = data.read_manifest(split)
    if utt is None:
        chosen = utts[0]
    else:
        found = [u for u in utts if u.id == utt]
        if not found:
            raise UnknownUtterance(f"plot_alignment: --utt {utt!r} is not in {split}")
        chosen = found[0]
    feats = features.utterance_cmvn(features.compute_fbank(data.load_audio(chosen.audio)))
    x, lens = feats[None], torch.tensor([feats.shape[0]])
    with torch.no_grad():
        c = model.config
        enc, enc_lens, alphas = model.encode(x, lens)
        if method == "greedy":
            ((tokens, frames),) = decode_lib.greedy_search(model, x, lens)
        else:
            ((tokens, frames),) = decode_lib.beam_search(model, x, lens, beam)
    words = [vocab.tokens[t] for t in tokens]
    hyp = vocab.decode(tokens)
    title = f"{chosen.id}\nREF: {chosen.text}\nHYP: {hyp}"
    plot(out, title, feats, alphas[0, : int(enc_lens[0])], frames, words, decode_lib.frame_period_s(c))
    print(f"plot_alignment: {chosen.id}: {len(frames)} tokens -> {out}")
    return out


def main(argv=None):
    try:
        plot_alignment(**vars(get_parser().parse_args(argv)))
    except UnknownUtterance as e:
        print(e.args[0], file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":  # python -m cifhkd.plot_alignment
    main()

"""The CPU demo (`make demo`): the paper's comparison on the synthetic English corpus.

    python python/demo.py                   # CIF baseline and CIF+HKD
    python python/demo.py --ablations       # also CIF+ACD and CIF+LRD
    python python/demo.py --seed 43 --out exp/s43   # another seed (cifhkd's conf/demo.yaml has the rest)
    python python/demo.py --seeds 42 43 44 --out exp/seeds   # k seeds of each system, pooled

Steps: synthesise the corpus (cifhkd.corpus.make_corpus, what prepare_demo_corpus.py
runs) and cache the teacher (cifhkd.teacher_cache) when missing; train every system in
its own process (`python -m cifhkd.train`, what train_hkd.py runs, in the current
directory: relative paths in the config are relative to it; on the GPU when CUDA is
there) with the same config, seed and step budget (--config; by default cifhkd's
conf/demo.yaml, package data), --jobs systems at a time with cores/jobs threads each; decode, in this
process (cifhkd.decode, what decode.py runs; on the GPU when CUDA is there), jobs systems
at a time, with beam search (--beam 10) and two protocols (PROTOCOLS):

    paper   the decoder alone with CIF's own token count (--count-search 0 --ctc-weight 0),
            the paper's decoding: the headline
    tuned   a search over CIF's count +-2 and CTC rescoring (--count-search 2
            --ctc-weight 0.3), chosen on dev

each split the corpus has: test (the claim's split: clauses not in training, spoken by
speakers never heard in training from the training population), dev (training voices),
test-accent (out of domain: an accent training never hears; no claim) and test-seen (the
test clauses from training voices), these two with the paper's decoding only; write

    OUT/results.md, OUT/results.json   the headline table (test with both protocols: CER,
                                       the gain over CIF with its 95% paired bootstrap
                                       interval over clauses, relative reduction; dev),
                                       the other splits' table, the trivial baselines,
                                       the CER per held-out voice
    OUT/curves.png                     training CE and CTC per token against the step
    OUT/alignment.png                  one test utterance: fbank, CIF weights, fired tokens
    OUT/<system>/                      train_hkd.py's experiment (checkpoints, logs) and
                                       decode-<split>-<protocol>/ (hypotheses, wer.json)
    OUT/<last system>/onnx/            its export (export_onnx.py) and decode-dev-onnx/, the
                                       dev split decoded with it in ONNX Runtime (the paper's
                                       decoding): its CER is printed and tabulated next to the
                                       PyTorch one (dev: 200 utterances, a check of the
                                       deployment path at 15 s, not a second test)

With --seeds S1 S2 ..., every seed's run goes to OUT/seed-<seed>/ as above (without the
ONNX export), then
OUT/pooled.md and pooled.json pool them per split and protocol: each system's CER over
all seeds, the gain over CIF and the relative reduction, the paired bootstrap interval
over clauses (every run of every system resampled on the same clauses) and the
t-interval of the mean gain over seeds.

A system whose experiment finished with the same command is not trained again (wherever
its folder was trained: a copied baseline is reused; wherever the config file is: its
text counts); one that was interrupted resumes
from its last checkpoint (`--resume`; with no checkpoint yet, the trainer starts it again
from step 0); one trained with another command or config is moved aside to
OUT/<system>.replaced-<time> and trained afresh. A split decoded before with the same
checkpoint and protocol is not decoded again. When Debian's pocketsphinx-testdata is
installed, its five LibriVox recordings (real speech, out of domain for voices trained
on synthetic speech) are decoded too (the paper's protocol) and reported on their own
line.

While the systems train, one status line shows them side by side: updates done of the
budget, the last logged loss per token, the time elapsed and left (cifhkd.progress reads
each system's train_log.jsonl every few seconds); while they decode, the splits decoded
of each. On a terminal the line is rewritten in place; in a log, it is a line every 30 s.
"""

import argparse
import importlib.resources
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import corpus as corpus_lib
from . import data
from . import decode as decode_lib
from . import files
from . import plot_alignment
from . import progress
from . import rundir
from . import teacher_cache

# the demo's training options: package data of cifhkd (recipe/cifhkd/conf/ in the repository)
DEFAULT_CONFIG = Path(str(importlib.resources.files("cifhkd").joinpath("conf", "demo.yaml")))
TRAIN_MODULE = ["-m", "cifhkd.train"]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


# name -> (label, ACD on, LRD on); the paper's Table rows
SYSTEMS = {
    "cif": ("CIF", False, False),
    "acd": ("CIF + ACD", True, False),
    "lrd": ("CIF + LRD", False, True),
    "hkd": ("CIF + HKD", True, True),
}


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("exp/demo"))
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="train_hkd.py options shared by every system (default: cifhkd's "
        "conf/demo.yaml, recipe/cifhkd/conf/demo.yaml in the repository)",
    )
    parser.add_argument("--ablations", action="store_true", help="also train CIF+ACD and CIF+LRD")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's budget")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train and decode every system with each seed (OUT/seed-<seed>/), then pool "
        "them: OUT/pooled.md (pooled CER, gains with paired bootstrap and t intervals)",
    )
    parser.add_argument(
        "--acd-weight",
        type=float,
        default=None,
        help="override the config's ACD weight in the systems with ACD (the baseline's "
        "training is unchanged, so it is reused)",
    )
    parser.add_argument(
        "--jobs", type=int, default=0, help="systems trained at once (0: one per core, at most all of them)"
    )
    parser.add_argument("--beam", type=int, default=10)
    return parser


def absolute_paths(args) -> argparse.Namespace:
    """args with --config (cifhkd's conf/demo.yaml by default) and --out absolute,
    resolved against the current directory: the training processes get them as absolute
    paths. SystemExit with a message when --config is not given and the package's
    conf/demo.yaml is missing."""
    if args.config is None:
        if not DEFAULT_CONFIG.is_file():
            sys.exit(
                f"demo: no --config given, and {DEFAULT_CONFIG} does not exist (an install of "
                "cifhkd without its package data): pass --config FILE (the repository's "
                "recipe/cifhkd/conf/demo.yaml is the demo's)"
            )
        args.config = DEFAULT_CONFIG
    args.config = args.config if args.config.is_absolute() else Path.cwd() / args.config
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    return args


def load_config(path: Path) -> dict:
    import yaml

    return {k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()}


def run_logged(cmd: List[str], log_path: Path, threads: int):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(
            f"demo: `{' '.join(cmd)}` failed (exit {result.returncode}); last lines of {log_path}:\n{tail}"
        )


def train_command(args, name: str) -> List[str]:
    """train_hkd.py's command for one system (without --threads, which does not change
    what is trained); args: absolute_paths'."""
    _, acd, lrd = SYSTEMS[name]
    cmd = [sys.executable, *TRAIN_MODULE, "--config", str(args.config), "--exp-dir", str(args.out / name)]
    if not acd:
        cmd += ["--acd-weight", "0"]
    elif args.acd_weight is not None:
        cmd += ["--acd-weight", f"{args.acd_weight:g}"]
    if not lrd:
        cmd += ["--lrd-weight", "0"]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    return cmd


def same_training(stamp: str, cmd: List[str], config_text: str) -> bool:
    """Whether a system's stamp (its training command + the config's text, as JSON) names
    this training: the same command and the same settings; comments and layout of the
    config do not count, nor does where the config file is (its text is compared). The
    --exp-dir does not count either: a trained system copied into another OUT (a baseline
    shared by two runs) is the same training."""
    import yaml

    old = json.loads(stamp)
    command = old[:-1]

    def placeless(c: List[str]) -> List[str]:
        return [a for i, a in enumerate(c) if not (i > 0 and c[i - 1] in ("--exp-dir", "--config"))]

    return placeless(command) == placeless(cmd) and yaml.safe_load(old[-1]) == yaml.safe_load(config_text)


def train(args, name: str, threads: int, training: progress.Training, status: progress.StatusLine) -> float:
    """Train one system (or skip it, or resume it); returns the wall seconds its last
    training run took. Its state goes to `training`, its messages to status.say."""
    exp = args.out / name
    cmd = train_command(args, name)
    config_text = Path(args.config).read_text()
    stamp = exp / "demo-command.json"
    if stamp.exists() and not same_training(stamp.read_text(), cmd, config_text):
        # kept, not deleted: a trained system is hours of CPU time
        kept = exp.with_name(f"{exp.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        exp.rename(kept)
        status.say(
            f"demo: {name}: the command or config changed; training again (the previous "
            f"experiment is now {kept}: delete it when it is no longer needed)"
        )
    seconds_file = exp / "demo-train-seconds.txt"
    if (exp / "averaged.pt").exists() and seconds_file.exists():
        training.state = "done"
        status.say(f"demo: {name}: already trained ({exp}); delete it to train again")
        return float(seconds_file.read_text())
    exp.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(cmd + [config_text]))
    cmd += ["--threads", str(threads)]
    if (exp / rundir.RECORD).exists() or any(exp.glob("checkpoint-*.pt")):
        # an interrupted run (the trainer refuses a fresh run into it): continue it
        cmd.append("--resume")
        status.say(
            f"demo: {name}: resuming from its last checkpoint"
            if any(exp.glob("checkpoint-*.pt"))
            else f"demo: {name}: an interrupted run with no checkpoint yet: starting it again"
        )
    start = time.perf_counter()
    status.say(f"demo: training {SYSTEMS[name][0]} ({threads} thread(s); log {exp / 'train.out'})")
    training.begin()
    try:
        run_logged(cmd, exp / "train.out", threads)
    except BaseException:
        training.state = "failed"
        raise
    training.state = "done"
    elapsed = time.perf_counter() - start
    seconds_file.write_text(f"{elapsed:.1f}\n")
    status.say(f"demo: {name} trained in {elapsed / 60:.1f} min")
    return elapsed


def librivox_manifest(out: Path):
    """JSONL manifest of pocketsphinx-testdata's LibriVox recordings, or None."""
    transcription = LIBRIVOX / "transcription"
    if not transcription.exists():
        return None
    import soundfile as sf

    path = out / "librivox.jsonl"
    with open(path, "w") as f:
        for line in transcription.read_text().splitlines():
            # "<s> words </s> (utt-id)"
            text, _, utt = line.rpartition("(")
            utt = utt.strip().rstrip(")")
            words = [w for w in text.split() if w not in ("<s>", "</s>")]
            audio = LIBRIVOX / f"{utt}.wav"
            f.write(
                json.dumps(
                    {"id": utt, "audio": str(audio), "text": " ".join(words), "duration": sf.info(str(audio)).duration}
                )
                + "\n"
            )
    return path


def constant_baseline(corpus: Path) -> dict:
    """The best constant hypothesis: the training transcript with the fewest character
    errors on dev, scored on test (what a recognizer that ignores the audio can reach)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    train = [u.text for u in data.read_manifest(corpus / "train")[0]]
    dev = [u.text.replace(" ", "") for u in data.read_manifest(corpus / "dev")[0]]
    test = [u.text for u in data.read_manifest(corpus / "test")[0]]
    cands = [t.replace(" ", "") for t in train]
    totals = cdist(cands, dev, scorer=Levenshtein.distance, workers=-1).sum(axis=1)
    best = train[int(totals.argmin())]
    result = decode_lib.score(test, [best] * len(test))
    result["hypothesis"] = best
    return result


def plot_curves(out: Path, names: List[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("ce", "ctc")):
            ax.plot(steps, [r[key] for r in rows], label=SYSTEMS[name][0])
    for ax, title in zip(axes, ("decoder cross-entropy per token", "CTC loss per token")):
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def bootstrap(
    decode_dirs: Dict[str, Union[Path, Sequence[Path]]], base: str = "cif", samples: int = 2000, seed: int = 0
) -> Dict[str, dict]:
    """95% bootstrap intervals of each system's CER and of its CER gain over `base` (base
    CER minus its CER, in points; paired: every resample scores all systems on the same
    utterances). The resampled unit is the test clause with all its voices, since they
    share the clause's difficulty. p_better: the share of resamples where the system
    beats the base. cer and gain: the point estimates, in % and points.

    A system given as several decode directories (the same system trained with several
    seeds, each decoded on the same test set) is pooled: a clause's errors and characters
    are summed over the runs, so its CER is the runs' overall CER and the resamples pair
    every run of every system on the same clauses."""
    runs = {
        name: [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
        for name, dirs in decode_dirs.items()
    }
    if any(not dirs for dirs in runs.values()):
        raise ValueError("demo: bootstrap: every system needs at least one decode directory")
    rows = {
        name: [[json.loads(line) for line in (d / "hyp.jsonl").read_text().splitlines()] for d in dirs]
        for name, dirs in runs.items()
    }
    clause_of = {}
    for r in rows[base][0]:
        clause_of.setdefault(r["ref"], len(clause_of))
    groups = {r["id"]: clause_of[r["ref"]] for r in rows[base][0]}
    chars, errors = {}, {}
    for name, system_runs in rows.items():
        chars[name], errors[name] = np.zeros(len(clause_of)), np.zeros(len(clause_of))
        for d, run in zip(runs[name], system_runs):
            if sorted(r["id"] for r in run) != sorted(groups):
                raise ValueError(f"demo: {d} decoded other utterances than {runs[base][0]}")
            for r in run:
                errors[name][groups[r["id"]]] += r["char_errors"]
                chars[name][groups[r["id"]]] += r["chars"]
    picks = np.random.default_rng(seed).integers(0, len(clause_of), size=(samples, len(clause_of)))
    cer = {name: 100 * e[picks].sum(axis=1) / chars[name][picks].sum(axis=1) for name, e in errors.items()}
    point = {name: 100 * errors[name].sum() / chars[name].sum() for name in rows}
    out = {}
    for name in rows:
        gain = cer[base] - cer[name]
        out[name] = {
            "cer": round(float(point[name]), 2),
            "gain": round(float(point[base] - point[name]), 2),
            "cer_ci": np.percentile(cer[name], [2.5, 97.5]).round(2).tolist(),
            "gain_ci": np.percentile(gain, [2.5, 97.5]).round(2).tolist(),
            "p_better": float((gain > 0).mean()),
            "clauses": len(clause_of),
            "samples": samples,
        }
    return out


# decode.py's options of the two decoding protocols
PROTOCOLS = {
    "paper": {"count_search": 0, "ctc_weight": 0.0},
    "tuned": {"count_search": decode_lib.COUNT_SEARCH, "ctc_weight": None},
}
PROTOCOL_TEXT = {
    "paper": "the paper's decoding: the decoder alone with CIF's own token count "
    "(decode.py --count-search 0 --ctc-weight 0)",
    "tuned": f"the tuned decoding: a search over CIF's count +-{decode_lib.COUNT_SEARCH} and CTC "
    f"rescoring (--count-search {decode_lib.COUNT_SEARCH} --ctc-weight "
    f"{decode_lib.CTC_WEIGHT}, chosen on dev)",
}
# what is decoded, in the tables' order; a split the corpus lacks is left out (test-accent
# and test-seen with the paper's decoding only: the tuned decoding's count search and CTC
# cost about twice as much, and make demo must stay under 30 minutes on 2 cores)
EVALS = [
    ("test", "paper"),
    ("test", "tuned"),
    ("dev", "paper"),
    ("dev", "tuned"),
    ("test-accent", "paper"),
    ("test-seen", "paper"),
]
SPLIT_TEXT = {
    "test": "test (held-out speakers of the training population, clauses not in training: the claim's split)",
    "dev": "dev (training voices, clauses not in training: where choices are made)",
    "test-accent": "test-accent (out of domain: an accent and a flite voice training never hears; no claim)",
    "test-seen": "test-seen (the test clauses spoken by training voices)",
}
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]  # Student's t, 97.5% quantile, 1..30 degrees of freedom


def decode_dir(split: str, protocol: str) -> str:
    return f"decode-{split}-{protocol}"


def decode_once(checkpoint: Path, split: Path, out: Path, beam: int, protocol: str, device: str, log) -> dict:
    """decode.decode with the protocol's options, or the scores of an earlier decoding of
    the same checkpoint (its size and time: a copied system's decodings are reused too),
    split, beam and protocol."""
    info = checkpoint.stat()
    stamp = {"checkpoint": [info.st_size, info.st_mtime_ns], "split": str(split), "beam": beam, **PROTOCOLS[protocol]}
    stamp_file = out / "demo-decode.json"
    if stamp_file.exists() and (out / "wer.json").exists() and json.loads(stamp_file.read_text()) == stamp:
        return json.loads((out / "wer.json").read_text())
    result = decode_lib.decode(checkpoint, split, out, beam=beam, device=device, log=log, **PROTOCOLS[protocol])
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return result


def t_interval(values: Sequence[float]) -> List[float]:
    """The 95% Student-t interval of the values' mean ([mean, mean] for one value; the
    normal quantile beyond 31 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return [float(values.mean())] * 2
    half = (T975[len(values) - 2] if len(values) <= 31 else 1.96) * values.std(ddof=1) / np.sqrt(len(values))
    return [round(float(values.mean() - half), 2), round(float(values.mean() + half), 2)]


def interval(pair: Sequence[float], sign: str = "") -> str:
    """[low, high] to two decimals; sign "+" for gains."""
    return f"[{pair[0]:{sign}.2f}, {pair[1]:{sign}.2f}]"


def gain_cell(c: dict) -> str:
    """A system's gain over the base with its 95% interval."""
    return f"{c['gain']:+.2f} {interval(c['gain_ci'], '+')}"


def relative(c: dict, base: dict) -> str:
    return f"{100 * c['gain'] / base['cer']:+.1f}%" if base["cer"] > 0 else "n/a"


def weights_cells(meta: dict, name: str) -> str:
    acd, bank, lrd = meta["weights"][name]
    return f"{acd:g} | {bank or '-'} | {lrd:g}" if acd else f"- | - | {lrd:g}" if lrd else "- | - | -"


def table(evals: Dict[str, dict], trivial: dict, librivox: Dict[str, dict], meta: dict) -> str:
    """One seed's tables: the headline (test, the paper's decoding, and the tuned one;
    dev), the other splits, the trivial baselines, the CER per held-out voice, real speech,
    the time. evals: {"split/protocol": {"systems": {name: decode scores}, "bootstrap": ...}}."""
    names = list(evals["test/paper"]["systems"])
    test, ci = evals["test/paper"]["systems"], evals["test/paper"]["bootstrap"]
    tuned = evals["test/tuned"]["bootstrap"]
    voices = len(test["cif"].get("per_speaker", {}))
    lines = [
        f"# CIF-HKD CPU demo (seed {meta['seed']}, {meta['max_steps']} updates per system)",
        "",
        f"Test: {test['cif']['utterances']} utterances ({ci['cif']['clauses']} clauses not in training, "
        f"each spoken by each of {voices} held-out speakers of the training population: voices never "
        "heard in training whose accent, engine and espeak variant training hears). "
        f"Headline: {PROTOCOL_TEXT['paper']}, beam {meta['beam']}; second: {PROTOCOL_TEXT['tuned']}. "
        "Gain: CIF's CER minus the system's, in points (positive = fewer errors), with its 95% paired "
        f"bootstrap interval over the test clauses ({ci['cif']['samples']} resamples); P(better): the "
        "share of resamples where the system beats CIF.",
        "",
        "| system | ACD weight | bank rows | LRD weight | test CER %, paper | 95% CI | gain, points "
        "(95% CI) | rel. CER reduction | P(better) | test WER %, paper | test CER %, tuned | gain, tuned "
        "(95% CI) | dev CER %, paper | dev CER %, tuned |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        c, first = ci[name], name == "cif"
        lines.append(
            f"| {SYSTEMS[name][0]} | {weights_cells(meta, name)} | {c['cer']:.2f} | {interval(c['cer_ci'])} | "
            + ("- | - | - | " if first else f"{gain_cell(c)} | {relative(c, ci['cif'])} | {c['p_better']:.2f} | ")
            + f"{100 * test[name]['wer']:.2f} | {tuned[name]['cer']:.2f} | "
            + ("- | " if first else f"{gain_cell(tuned[name])} | ")
            + " | ".join(f"{100 * evals[f'dev/{p}']['systems'][name]['cer']:.2f}" for p in PROTOCOLS)
            + " |"
        )
    lines.append(
        f"| trivial: best constant sentence | | | | {100 * trivial['cer']:.2f} | | | | | "
        f"{100 * trivial['wer']:.2f} | | | | |"
    )
    lines += [
        "",
        f'The constant sentence (the training transcript closest to dev): "{trivial["hypothesis"]}"; '
        "the empty output scores 100%.",
    ]
    others = [key for key in evals if key.split("/")[0] not in ("test", "dev")]
    if others:
        lines += [
            "",
            "Other splits, the same systems (CER %, and the gain over CIF in points with its 95% "
            "interval): " + "; ".join(SPLIT_TEXT[s] for s in dict.fromkeys(k.split("/")[0] for k in others)) + ".",
            "",
            "| system | " + " | ".join(f"{k.replace('/', ', ')} CER % | gain (95% CI)" for k in others) + " |",
            "| --- |" + " ---: |" * (2 * len(others)),
        ]
        for name in names:
            lines.append(
                f"| {SYSTEMS[name][0]} | "
                + " | ".join(
                    f"{evals[k]['bootstrap'][name]['cer']:.2f} | "
                    + ("-" if name == "cif" else gain_cell(evals[k]["bootstrap"][name]))
                    for k in others
                )
                + " |"
            )
    for key in ("test/paper", "test-accent/paper"):
        systems = evals.get(key, {}).get("systems", {})
        speakers = sorted(systems.get("cif", {}).get("per_speaker", {}))
        if speakers:
            lines += [
                "",
                f"CER % per voice, {key.replace('/', ', ')}:",
                "",
                "| voice | utterances | " + " | ".join(SYSTEMS[n][0] for n in names) + " |",
                "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
            ]
            for spk in speakers:
                lines.append(
                    f"| {spk} | {systems['cif']['per_speaker'][spk]['utterances']} | "
                    + " | ".join(f"{100 * systems[n]['per_speaker'][spk]['cer']:.2f}" for n in names)
                    + " |"
                )
    if librivox:
        lines += [
            "",
            "Real speech (5 LibriVox recordings of Debian's pocketsphinx-testdata, out of domain: "
            "the models heard synthetic voices only), the paper's decoding:",
            "",
        ]
        lines += [
            f"- {SYSTEMS[n][0]}: CER {100 * r['cer']:.2f}%, WER {100 * r['wer']:.2f}%" for n, r in librivox.items()
        ]
    lines += [
        "",
        "Training wall time: "
        + ", ".join(f"{SYSTEMS[n][0]} {t / 60:.1f} min" for n, t in meta["train_seconds"].items())
        + f" ({meta['jobs']} system(s) at a time, {meta['threads']} thread(s) each, on {meta['device']}); "
        f"this run of demo.py {meta['total_seconds'] / 60:.1f} min on {os.cpu_count()} cores "
        "(systems trained or splits decoded before are reused, their time not counted).",
    ]
    return "\n".join(lines) + "\n"


def pooled(out: Path, seeds: Sequence[int], names: Sequence[str], keys: Sequence[str]) -> Dict[str, dict]:
    """Each system's decodings of every seed (OUT/seed-<s>/<system>/decode-*) pooled per
    split and protocol: the pooled bootstrap (bootstrap()) and, per system, the CER and
    gain of each seed and the 95% t-interval of the mean gain over the seeds."""
    result = {}
    for key in keys:
        dirs = {n: [out / f"seed-{s}" / n / decode_dir(*key.split("/")) for s in seeds] for n in names}
        ci = bootstrap(dirs)
        per_seed = {n: [100 * json.loads((d / "wer.json").read_text())["cer"] for d in dirs[n]] for n in names}
        for n in names:
            gains = [b - c for b, c in zip(per_seed["cif"], per_seed[n])]
            ci[n].update(
                {
                    "seed_cer": [round(c, 2) for c in per_seed[n]],
                    "seed_gain": [round(g, 2) for g in gains],
                    "seed_gain_mean": round(float(np.mean(gains)), 2),
                    "seed_gain_t_ci": t_interval(gains),
                    "relative_gain": round(100 * ci[n]["gain"] / ci["cif"]["cer"], 1),
                }
            )
        result[key] = ci
    return result


def pooled_table(results: Dict[str, dict], seeds: Sequence[int], meta: dict) -> str:
    names = list(results["test/paper"])
    lines = [
        f"# CIF-HKD demo pooled over seeds {', '.join(map(str, seeds))} ({meta['max_steps']} updates per system)",
        "",
        "Per split and decoding: each system's CER over all its seeds' decodings; the gain over CIF "
        "(CIF's CER minus the system's, points) with its 95% paired bootstrap interval over clauses "
        "(every seed of every system resampled on the same clauses); the relative CER reduction; "
        "each seed's gain; and the 95% t-interval of the mean gain over seeds (the spread between "
        f"trainings). Paper: {PROTOCOL_TEXT['paper']}; tuned: {PROTOCOL_TEXT['tuned']}.",
        "",
        "| system | ACD weight | bank rows | LRD weight |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {SYSTEMS[n][0]} | {weights_cells(meta, n)} |" for n in names]
    for key, ci in results.items():
        split, protocol = key.split("/")
        lines += [
            "",
            f"## {SPLIT_TEXT[split]}, {protocol} decoding",
            "",
            "| system | pooled CER % | 95% CI | gain, points (95% CI) | rel. CER reduction | P(better) "
            "| CER per seed | gain per seed | mean gain (t 95% CI) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for n in names:
            c = ci[n]
            lines.append(
                f"| {SYSTEMS[n][0]} | {c['cer']:.2f} | {interval(c['cer_ci'])} | "
                + (
                    "- | - | - | "
                    if n == "cif"
                    else f"{gain_cell(c)} | {c['relative_gain']:+.1f}% | {c['p_better']:.2f} | "
                )
                + ", ".join(f"{v:.2f}" for v in c["seed_cer"])
                + " | "
                + (
                    "- | - |"
                    if n == "cif"
                    else ", ".join(f"{v:+.2f}" for v in c["seed_gain"])
                    + f" | {c['seed_gain_mean']:+.2f} "
                    + (interval(c["seed_gain_t_ci"], "+") if len(seeds) > 1 else "(one seed)")
                    + " |"
                )
            )
    return "\n".join(lines) + "\n"


def run_seed(
    args, out: Path, seed: Optional[int], corpus: Path, names: List[str], budget: int, start: float, export: bool = True
) -> Dict[str, dict]:
    """Train (or reuse) every system with this seed in OUT, decode every split of EVALS the
    corpus has, export the last system to ONNX and decode dev with it (with `export`),
    write OUT/results.md, results.json and the pictures.
    -> the evals ({"split/protocol": {"systems": ..., "bootstrap": ...}})."""
    args = argparse.Namespace(**{**vars(args), "out": out, "seed": seed})
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = args.jobs or min(cores, len(names))
    threads = max(1, cores // jobs)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # training, jobs systems at a time (on CUDA, train.py's --device auto takes the GPU)
    phase = progress.Phase("training", {n: progress.Training(SYSTEMS[n][0], out / n, budget) for n in names})
    with progress.StatusLine(phase.render) as status, ThreadPoolExecutor(max_workers=jobs) as pool:
        seconds = dict(zip(names, pool.map(lambda n: train(args, n, threads, phase.items[n], status), names)))

    # decoding and scoring, jobs systems at a time as in training
    evals = [(split, protocol) for split, protocol in EVALS if (corpus / split / "text").exists()]
    librivox = librivox_manifest(out)
    total = len(evals) + (librivox is not None)
    phase = progress.Phase("decoding", {n: progress.Decoding(SYSTEMS[n][0], total) for n in names})

    def decode_system(name: str) -> Dict[str, dict]:
        done = {}
        for split, protocol in evals + ([("librivox", "paper")] if librivox is not None else []):
            path = librivox if split == "librivox" else corpus / split
            done[f"{split}/{protocol}"] = decode_once(
                out / name / "averaged.pt",
                path,
                out / name / decode_dir(split, protocol),
                args.beam,
                protocol,
                device,
                status.say,
            )
            phase.items[name].done += 1
        return done

    torch.set_num_threads(threads)
    # transformers resolves its names lazily, and two threads importing it at once can fail
    from transformers import AutoTokenizer  # noqa: F401

    with progress.StatusLine(phase.render) as status, ThreadPoolExecutor(max_workers=jobs) as pool:
        decoded = dict(zip(names, pool.map(decode_system, names)))
    results = {}
    for split, protocol in evals:
        key = f"{split}/{protocol}"
        results[key] = {
            "systems": {n: decoded[n][key] for n in names},
            "bootstrap": bootstrap({n: out / n / decode_dir(split, protocol) for n in names}),
        }
    real = {n: decoded[n]["librivox/paper"] for n in names if "librivox/paper" in decoded[n]}
    trivial = constant_baseline(corpus)
    # deployment: the last system exported to ONNX, its dev split decoded in ONNX Runtime
    deploy_text, deployed = (
        deploy(out / names[-1], corpus / "dev", SYSTEMS[names[-1]][0], args.beam) if export else ("", None)
    )

    plot_curves(out, names)
    plot_alignment.plot_alignment(
        out / names[-1] / "averaged.pt", corpus / "test", out / "alignment.png", beam=args.beam
    )
    meta = run_meta(out, names)
    meta.update(
        {
            "beam": args.beam,
            "train_seconds": seconds,
            "jobs": jobs,
            "threads": threads,
            "device": device,
            "total_seconds": time.perf_counter() - start,
        }
    )
    text = table(results, trivial, real, meta) + deploy_text
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {"evals": results, "trivial_constant": trivial, "librivox": real, "onnx": deployed, **meta}, indent=1
        )
        + "\n"
    )
    print("\n" + text)
    print(f"demo: wrote {out}/results.md, results.json, curves.png, alignment.png")
    return results


def check_corpus(corpus: Path) -> None:
    """SystemExit when `corpus` is a demo corpus made before the claim's split (its test
    split was then the accent shift, which the tables would call held-out speakers of the
    training population)."""
    marker = corpus / corpus_lib.MARKER
    if marker.is_file() and "accent_test_voices" not in json.loads(marker.read_text()).get("options", {}):
        sys.exit(
            f"demo: {corpus} is a demo corpus made before its test split held out speakers of the "
            "training population (its test split is an unheard accent): delete it, or set another "
            "corpus: folder in the config, and run again to synthesise the current one"
        )


def run_meta(out: Path, names: Sequence[str]) -> dict:
    """The seed, budget and weights the systems in OUT were trained with (their args.json)."""
    trained = {name: json.loads((out / name / "args.json").read_text()) for name in names}
    first = trained[names[0]]
    return {
        "seed": first["seed"],
        "max_steps": first["max_steps"],
        "weights": {name: (a["acd_weight"], a.get("acd_bank", 0), a["lrd_weight"]) for name, a in trained.items()},
    }


ONNX_DIR = "onnx"  # OUT/<system>/onnx: export_onnx.py's folder


def deploy(exp: Path, split: Path, label: str, beam: int) -> Tuple[str, dict]:
    """Export exp/averaged.pt to exp/onnx (kept when it is that checkpoint's export,
    else moved aside and made again) and decode `split` with it in ONNX Runtime into
    exp/decode-<split>-onnx, float32, with the paper's decoding as decode-<split>-paper was
    decoded; -> (lines for results.md, numbers for results.json: CERs, the utterances with
    the PyTorch decode's hypothesis, seconds)."""
    from . import export as export_lib

    checkpoint, folder = exp / "averaged.pt", exp / ONNX_DIR
    start = time.perf_counter()
    if folder.exists():
        try:
            source = json.loads((folder / "config.json").read_text())["source"]["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            source = None
        if source != files.sha256_file(checkpoint):
            folder.rename(folder.with_name(f"{ONNX_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not folder.exists():
        export_lib.export(checkpoint, folder)
    export_s = time.perf_counter() - start
    onnx_dir = decode_dir(split.name, "onnx")
    result = decode_lib.decode(None, split, exp / onnx_dir, onnx=folder, beam=beam, **PROTOCOLS["paper"])
    decode_s = time.perf_counter() - start - export_s
    pytorch_dir = decode_dir(split.name, "paper")
    pytorch = json.loads((exp / pytorch_dir / "wer.json").read_text())
    hyps = [(exp / d / "hyp.txt").read_text().splitlines() for d in (pytorch_dir, onnx_dir)]
    same = sum(a == b for a, b in zip(*hyps))
    numbers = {
        "split": split.name,
        "cer": result["cer"],
        "pytorch_cer": pytorch["cer"],
        "same_hypothesis": same,
        "utterances": len(hyps[0]),
        "export_s": round(export_s, 1),
        "decode_s": round(decode_s, 1),
    }
    text = (
        f"\nDeployed: {label} exported to ONNX (python/export_onnx.py, {folder.name}/) and the {split.name} "
        f"split decoded in ONNX Runtime, float32, with the paper's decoding (beam {beam}): "
        f"{split.name} CER {100 * result['cer']:.2f}% (PyTorch {100 * pytorch['cer']:.2f}%), the PyTorch "
        f"hypothesis for {same} of {len(hyps[0])} utterances; export {export_s:.0f} s, "
        f"decoding {decode_s:.0f} s.\n"
    )
    print(text.strip())
    return text, numbers


def main(argv=None):
    parser = get_parser()
    args = absolute_paths(parser.parse_args(argv))
    if args.seeds and args.seed is not None:
        parser.error("--seed and --seeds: give one")
    start = time.perf_counter()
    config = load_config(args.config)
    # relative to this directory, as for the training processes, which run in it
    corpus = Path.cwd() / config.get("corpus", "data/demo")
    teacher_dir = Path.cwd() / config.get("teacher_dir", "exp/teacher")
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["cif", "acd", "lrd", "hkd"] if args.ablations else ["cif", "hkd"]

    # corpus and teacher cache, once for all systems (train_hkd.py only checks them)
    if not (corpus / "train" / "text").exists():
        corpus_lib.make_corpus(corpus)
    check_corpus(corpus)
    # made, or checked against the corpus (rebuilt where stale)
    teacher_cache.build_cache(teacher_dir, corpus / "train", [corpus / "train", corpus / "dev"])
    budget = args.max_steps if args.max_steps is not None else int(config.get("max_steps") or 0)

    if not args.seeds:
        run_seed(args, args.out, args.seed, corpus, names, budget, start)
        return 0
    for seed in args.seeds:
        run_seed(args, args.out / f"seed-{seed}", seed, corpus, names, budget, start, export=False)
    keys = list(json.loads((args.out / f"seed-{args.seeds[0]}" / "results.json").read_text())["evals"])
    results = pooled(args.out, args.seeds, names, keys)
    meta = run_meta(args.out / f"seed-{args.seeds[0]}", names)
    text = pooled_table(results, args.seeds, meta)
    (args.out / "pooled.md").write_text(text)
    (args.out / "pooled.json").write_text(json.dumps({"seeds": args.seeds, "pooled": results, **meta}, indent=1) + "\n")
    print("\n" + text)
    print(f"demo: wrote {args.out}/pooled.md, pooled.json (each seed's tables: {args.out}/seed-<seed>/results.md)")
    return 0


if __name__ == "__main__":  # python -m cifhkd.demo
    main()

"""The CPU demo (`make demo`): the paper's comparison on the synthetic English corpus.

    python python/demo.py                   # CIF baseline and CIF+HKD
    python python/demo.py --ablations       # also CIF+ACD and CIF+LRD
    python python/demo.py --seed 43 --out exp/s43   # another seed (conf/demo.yaml has the rest)

Steps: synthesise the corpus (cifhkd.corpus.make_corpus, what prepare_demo_corpus.py
runs) and cache the teacher (cifhkd.teacher_cache) when missing; train every system in
its own process (`python -m cifhkd.train`, what train_hkd.py runs, in the current
directory: relative paths in the config are relative to it) with the same config, seed
and step budget (--config; by default the checkout's conf/demo.yaml), --jobs systems at
a time with cores/jobs threads each; decode, in this process (cifhkd.decode, what
decode.py runs), the held-out-voice test split and the dev split (training voices) with
beam search, the same way, jobs systems at a time, and the test split again with the
decoder alone (--ctc-weight 0: the paper's decoding), and test-seen (the test clauses
spoken by training voices, when the corpus has it) that way too; write

    OUT/results.md, OUT/results.json   the table: CER/WER per system, relative reductions
                                       against the baseline, 95% bootstrap intervals of
                                       the test CER and of the gain over the baseline,
                                       dev CER, the trivial baselines, and the test CER
                                       per held-out voice; then the test CER and gain of
                                       the decoder alone on test and test-seen
    OUT/curves.png                     training CE and CTC per token against the step
    OUT/alignment.png                  one test utterance: fbank, CIF weights, fired tokens
    OUT/<system>/                      train_hkd.py's experiment (checkpoints, logs) and
                                       decode-test/, decode-dev/ (hypotheses, wer.json),
                                       decode-test-decoder/, decode-test-seen-decoder/
                                       (the decoder alone)
    OUT/<last system>/onnx/            its export (export_onnx.py) and decode-test-onnx/, the
                                       test split decoded with it in ONNX Runtime: its CER is
                                       printed and tabulated next to the PyTorch one

A system whose experiment finished with the same command is not trained again; one that
was interrupted resumes from its last checkpoint; one trained with another command or
config is moved aside to OUT/<system>.replaced-<time> and trained afresh. When Debian's
pocketsphinx-testdata is installed, its five LibriVox recordings (real speech, out of
domain for voices trained on synthetic speech) are decoded too and reported on their own
line.

While the systems train, one status line shows them side by side: updates done of the
budget, the last logged loss per token, the time elapsed and left (cifhkd.progress reads
each system's train_log.jsonl every few seconds); while they decode, the splits decoded
of each. On a terminal the line is rewritten in place; in a log, it is a line every 30 s.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from . import corpus as corpus_lib
from . import data
from . import decode as decode_lib
from . import plot_alignment
from . import progress
from . import teacher_cache

# the folder holding this package: in a repository checkout the repository, where conf/ is
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "conf" / "demo.yaml"
TRAIN_MODULE = ["-m", "cifhkd.train"]
OLD_TRAIN_SCRIPT = "python/train_hkd.py"    # what the demo ran before: in old stamps
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")

DECODER_ALONE_DIR = "decode-test-decoder"   # the test split decoded with --ctc-weight 0
SEEN_DECODER_DIR = "decode-test-seen-decoder"   # test-seen (training voices), the same way

# name -> (label, ACD on, LRD on); the paper's Table rows
SYSTEMS = {"cif": ("CIF", False, False), "acd": ("CIF + ACD", True, False),
           "lrd": ("CIF + LRD", False, True), "hkd": ("CIF + HKD", True, True)}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("exp/demo"))
    parser.add_argument("--config", type=Path, default=None,
                        help="train_hkd.py options shared by every system (default: conf/demo.yaml "
                             "of the repository checkout holding cifhkd)")
    parser.add_argument("--ablations", action="store_true", help="also train CIF+ACD and CIF+LRD")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's budget")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--jobs", type=int, default=0,
                        help="systems trained at once (0: one per core, at most all of them)")
    parser.add_argument("--beam", type=int, default=10)
    return parser


def absolute_paths(args) -> argparse.Namespace:
    """args with --config (the checkout's conf/demo.yaml by default) and --out absolute,
    resolved against the current directory: the training processes get them as absolute
    paths. SystemExit with a message when --config is not given and cifhkd is not in a
    repository checkout."""
    if args.config is None:
        if not DEFAULT_CONFIG.is_file():
            sys.exit(f"demo: no --config given, and {DEFAULT_CONFIG} does not exist (cifhkd is not "
                     "in a repository checkout): pass --config FILE (the repository's conf/demo.yaml "
                     "is the demo's)")
        args.config = DEFAULT_CONFIG
    args.config = args.config if args.config.is_absolute() else Path.cwd() / args.config
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    return args


def load_config(path: Path) -> dict:
    import yaml
    return {k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()}


def python_env() -> dict:
    """This environment, with the folder of this cifhkd package first on PYTHONPATH: the
    training processes run the same code as the demo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_logged(cmd: List[str], log_path: Path, threads: int):
    env = python_env()
    env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"demo: `{' '.join(cmd)}` failed (exit {result.returncode}); "
                           f"last lines of {log_path}:\n{tail}")


def train_command(args, name: str) -> List[str]:
    """train_hkd.py's command for one system (without --threads, which does not change
    what is trained); args: absolute_paths'."""
    _, acd, lrd = SYSTEMS[name]
    cmd = [sys.executable, *TRAIN_MODULE, "--config", str(args.config),
           "--exp-dir", str(args.out / name)]
    if not acd:
        cmd += ["--acd-weight", "0"]
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
    config do not count. A stamp of the command's previous form (the script
    python/train_hkd.py of the checkout, run from it) names the same training as
    `python -m cifhkd.train`."""
    import yaml
    old = json.loads(stamp)
    command = old[:-1]
    if len(command) > 1 and command[1].replace(os.sep, "/").endswith(OLD_TRAIN_SCRIPT):
        command[1:2] = TRAIN_MODULE
    return command == cmd and yaml.safe_load(old[-1]) == yaml.safe_load(config_text)


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
        status.say(f"demo: {name}: the command or config changed; training again (the previous "
                   f"experiment is now {kept}: delete it when it is no longer needed)")
    seconds_file = exp / "demo-train-seconds.txt"
    if (exp / "averaged.pt").exists() and seconds_file.exists():
        training.state = "done"
        status.say(f"demo: {name}: already trained ({exp}); delete it to train again")
        return float(seconds_file.read_text())
    exp.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(cmd + [config_text]))
    cmd += ["--threads", str(threads)]
    if any(exp.glob("checkpoint-*.pt")):
        cmd.append("--resume")
        status.say(f"demo: {name}: resuming from its last checkpoint")
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
            f.write(json.dumps({"id": utt, "audio": str(audio), "text": " ".join(words),
                                "duration": sf.info(str(audio)).duration}) + "\n")
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
        rows = [json.loads(l) for l in (out / name / "train_log.jsonl").read_text().splitlines()]
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


def bootstrap(decode_dirs: Dict[str, Union[Path, Sequence[Path]]], base: str = "cif",
              samples: int = 2000, seed: int = 0) -> Dict[str, dict]:
    """95% bootstrap intervals of each system's CER and of its CER gain over `base` (base
    CER minus its CER, in points; paired: every resample scores all systems on the same
    utterances). The resampled unit is the test clause with all its voices, since they
    share the clause's difficulty. p_better: the share of resamples where the system
    beats the base. cer and gain: the point estimates, in % and points.

    A system given as several decode directories (the same system trained with several
    seeds, each decoded on the same test set) is pooled: a clause's errors and characters
    are summed over the runs, so its CER is the runs' overall CER and the resamples pair
    every run of every system on the same clauses."""
    runs = {name: [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
            for name, dirs in decode_dirs.items()}
    if any(not dirs for dirs in runs.values()):
        raise ValueError("demo: bootstrap: every system needs at least one decode directory")
    rows = {name: [[json.loads(line) for line in (d / "hyp.jsonl").read_text().splitlines()]
                   for d in dirs] for name, dirs in runs.items()}
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
        out[name] = {"cer": round(float(point[name]), 2), "gain": round(float(point[base] - point[name]), 2),
                     "cer_ci": np.percentile(cer[name], [2.5, 97.5]).round(2).tolist(),
                     "gain_ci": np.percentile(gain, [2.5, 97.5]).round(2).tolist(),
                     "p_better": float((gain > 0).mean()), "clauses": len(clause_of), "samples": samples}
    return out


def interval(pair: Sequence[float], sign: str = "") -> str:
    """[low, high] to two decimals; sign "+" for gains."""
    return f"[{pair[0]:{sign}.2f}, {pair[1]:{sign}.2f}]"


def gain_cells(c: dict) -> str:
    """A system's bootstrap row as table cells: gain over the base (95% CI) | P(better) |"""
    return f"{c['gain']:+.2f} {interval(c['gain_ci'], '+')} | {c['p_better']:.2f} | "


def table(results: Dict[str, dict], dev: Dict[str, dict], trivial: dict, librivox: Dict[str, dict],
          ci: Dict[str, dict], meta: dict) -> str:
    base = results["cif"]["cer"], results["cif"]["wer"]

    def rel(new, old):
        return f"{100 * (old - new) / old:+.1f}%" if old > 0 else "n/a"

    lines = [f"# CIF-HKD CPU demo (seed {meta['seed']}, {meta['max_steps']} updates per system)", "",
             f"Test: {results['cif']['utterances']} utterances of held-out voices "
             f"({ci['cif']['clauses']} clauses, each spoken by every held-out voice), "
             f"{results['cif']['words']} words; beam {meta['beam']}, token counts CIF's "
             f"+-{results['cif']['count_search']} (decode.py --count-search), CTC weight "
             f"{results['cif']['ctc_weight']} in the hypothesis score (--ctc-weight). "
             "Relative reductions and gains are against the CIF baseline (positive = fewer errors). "
             f"95% intervals: paired bootstrap over test clauses ({ci['cif']['samples']} resamples); "
             "P(better): the share of resamples where the system beats CIF.", "",
             "| system | ACD weight | LRD weight | test CER % | 95% CI | test WER % | rel. CER reduction "
             "| CER gain, points (95% CI) | P(better) | rel. WER reduction | dev CER % | rel. dev CER reduction |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        label = SYSTEMS[name][0]
        first = name == "cif"
        acd, lrd = (f"{w:g}" if w else "-" for w in meta["weights"][name])
        lines.append(f"| {label} | {acd} | {lrd} | "
                     f"{100 * r['cer']:.2f} | {interval(ci[name]['cer_ci'])} | {100 * r['wer']:.2f} | "
                     f"{'-' if first else rel(r['cer'], base[0])} | "
                     + ("- | - | " if first else
                        gain_cells(ci[name]))
                     + f"{'-' if first else rel(r['wer'], base[1])} | {100 * dev[name]['cer']:.2f} | "
                     f"{'-' if first else rel(dev[name]['cer'], dev['cif']['cer'])} |")
    lines.append(f"| trivial: best constant sentence | - | - | {100 * trivial['cer']:.2f} | | "
                 f"{100 * trivial['wer']:.2f} | | | | | | |")
    lines.append("| trivial: empty output | - | - | 100.00 | | 100.00 | | | | | 100.00 | |")
    lines += ["", f"The constant sentence (the training transcript closest to dev): "
              f"\"{trivial['hypothesis']}\". Dev: {dev['cif']['utterances']} utterances of "
              "training voices, clauses not in training."]
    speakers = sorted(results["cif"].get("per_speaker", {}))
    if speakers:
        lines += ["", "Test CER % per held-out voice:", "",
                  "| voice | utterances | " + " | ".join(SYSTEMS[n][0] for n in results) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in results) + " |"]
        for spk in speakers:
            lines.append(f"| {spk} | {results['cif']['per_speaker'][spk]['utterances']} | " + " | ".join(
                f"{100 * r['per_speaker'][spk]['cer']:.2f}" for r in results.values()) + " |")
    if librivox:
        lines += ["", "Real speech (5 LibriVox recordings of Debian's pocketsphinx-testdata, "
                  "out of domain: the models heard synthetic voices only):", ""]
        lines += [f"- {SYSTEMS[n][0]}: CER {100 * r['cer']:.2f}%, WER {100 * r['wer']:.2f}%"
                  for n, r in librivox.items()]
    lines += ["", f"Training wall time: " + ", ".join(
        f"{SYSTEMS[n][0]} {t / 60:.1f} min" for n, t in meta["train_seconds"].items())
              + f" ({meta['jobs']} system(s) at a time, {meta['threads']} thread(s) each); "
              f"this run of demo.py {meta['total_seconds'] / 60:.1f} min on {os.cpu_count()} cores "
              "(systems trained before are reused, their time not counted)."]
    return "\n".join(lines) + "\n"


def decoder_table(results: Dict[str, dict], ci: Dict[str, dict], seen: Dict[str, dict],
                  ci_seen: Dict[str, dict]) -> str:
    """The test split decoded with the decoder alone (--ctc-weight 0), and test-seen (when
    decoded: `seen` not empty) the same way."""
    def header(split: str) -> str:
        return f" {split} CER % | {split} 95% CI | {split} WER % | CER gain, points (95% CI) | P(better) |"

    lines = ["", f"Decoded with the decoder alone (`--ctc-weight 0`, as the paper decodes; count search "
             f"+-{results['cif']['count_search']} kept): CER, and the gain over CIF with its 95% interval "
             "(the same bootstrap), on the test split (new sentences from held-out voices)"
             + (f" and on test-seen (the same sentences from training voices, {seen['cif']['utterances']} "
                "utterances: what a system does for new sentences, apart from new voices)" if seen else "")
             + ":", "",
             "| system |" + header("test") + (header("test-seen") if seen else ""),
             "| --- |" + " ---: |" * (10 if seen else 5)]

    def cells(r: dict, c: dict, first: bool) -> str:
        return (f" {100 * r['cer']:.2f} | {interval(c['cer_ci'])} | {100 * r['wer']:.2f} | "
                + ("- | - |" if first else gain_cells(c).rstrip()))

    for name, r in results.items():
        lines.append(f"| {SYSTEMS[name][0]} |" + cells(r, ci[name], name == "cif")
                     + (cells(seen[name], ci_seen[name], name == "cif") if seen else ""))
    return "\n".join(lines) + "\n"


ONNX_DIR = "onnx"                       # OUT/<system>/onnx: export_onnx.py's folder
ONNX_DECODE_DIR = "decode-test-onnx"    # its test split decoded in ONNX Runtime


def deploy(exp: Path, test: Path, label: str, beam: int) -> Tuple[str, dict]:
    """Export exp/averaged.pt to exp/onnx (kept when it is that checkpoint's export,
    else moved aside and made again) and decode the test split with it in ONNX Runtime,
    float32, as decode-test was decoded; -> (lines for results.md, numbers for
    results.json: CERs, the utterances with the PyTorch decode's hypothesis, seconds)."""
    from . import export as export_lib
    checkpoint, folder = exp / "averaged.pt", exp / ONNX_DIR
    start = time.perf_counter()
    if folder.exists():
        try:
            source = json.loads((folder / "config.json").read_text())["source"]["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            source = None
        if source != export_lib.sha256(checkpoint):
            folder.rename(folder.with_name(f"{ONNX_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not folder.exists():
        export_lib.export(checkpoint, folder)
    export_s = time.perf_counter() - start
    result = decode_lib.decode(None, test, exp / ONNX_DECODE_DIR, onnx=folder, beam=beam)
    decode_s = time.perf_counter() - start - export_s
    pytorch = json.loads((exp / "decode-test" / "wer.json").read_text())
    hyps = [(exp / d / "hyp.txt").read_text().splitlines() for d in ("decode-test", ONNX_DECODE_DIR)]
    same = sum(a == b for a, b in zip(*hyps))
    numbers = {"cer": result["cer"], "pytorch_cer": pytorch["cer"], "same_hypothesis": same,
               "utterances": len(hyps[0]), "export_s": round(export_s, 1), "decode_s": round(decode_s, 1)}
    text = (f"\nDeployed: {label} exported to ONNX (python/export_onnx.py, {folder.name}/) and the test split "
            f"decoded in ONNX Runtime, float32, as above (beam {beam}, CTC weight {result['ctc_weight']}): "
            f"test CER {100 * result['cer']:.2f}% (PyTorch {100 * pytorch['cer']:.2f}%), the PyTorch "
            f"hypothesis for {same} of {len(hyps[0])} utterances; export {export_s:.0f} s, "
            f"decoding {decode_s:.0f} s.\n")
    print(text.strip())
    return text, numbers


def main(argv=None):
    args = absolute_paths(get_parser().parse_args(argv))
    start = time.perf_counter()
    config = load_config(args.config)
    # relative to this directory, as for the training processes, which run in it
    corpus = Path.cwd() / config.get("corpus", "data/demo")
    teacher_dir = Path.cwd() / config.get("teacher_dir", "exp/teacher")
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["cif", "acd", "lrd", "hkd"] if args.ablations else ["cif", "hkd"]

    # 1. corpus and teacher cache, once for all systems (train_hkd.py only checks them)
    if not (corpus / "train" / "text").exists():
        corpus_lib.make_corpus(corpus)
    # made, or checked against the corpus (rebuilt where stale)
    teacher_cache.build_cache(teacher_dir, corpus / "train", [corpus / "train", corpus / "dev"])

    # 2. training, jobs systems at a time
    cores = os.cpu_count() or 1
    jobs = args.jobs or min(cores, len(names))
    threads = max(1, cores // jobs)
    budget = args.max_steps if args.max_steps is not None else int(config.get("max_steps") or 0)
    phase = progress.Phase("training", {n: progress.Training(SYSTEMS[n][0], args.out / n, budget) for n in names})
    with progress.StatusLine(phase.render) as status, ThreadPoolExecutor(max_workers=jobs) as pool:
        seconds = dict(zip(names, pool.map(lambda n: train(args, n, threads, phase.items[n], status), names)))

    # 3. decoding and scoring, jobs systems at a time as in training
    librivox = librivox_manifest(args.out)
    splits = {"test": corpus / "test", "dev": corpus / "dev"}
    if librivox is not None:
        splits["librivox"] = librivox

    has_seen = (corpus / "test-seen" / "text").exists()   # corpora made before test-seen existed lack it
    phase = progress.Phase("decoding", {n: progress.Decoding(SYSTEMS[n][0], len(splits) + 1 + has_seen)
                                        for n in names})

    def decode_system(name: str) -> Dict[str, dict]:
        def run_decode(split: Path, out: str, ctc_weight=None) -> dict:
            result = decode_lib.decode(args.out / name / "averaged.pt", split, args.out / name / out,
                                       beam=args.beam, ctc_weight=ctc_weight, log=status.say)
            phase.items[name].done += 1
            return result
        done = {split: run_decode(path, f"decode-{split}") for split, path in splits.items()}
        # the decoder alone, as the paper decodes: what distillation does to the decoder,
        # without the CTC branch's score (which the systems share)
        done["test_decoder"] = run_decode(splits["test"], DECODER_ALONE_DIR, ctc_weight=0.0)
        if has_seen:
            done["test_seen_decoder"] = run_decode(corpus / "test-seen", SEEN_DECODER_DIR, ctc_weight=0.0)
        return done

    torch.set_num_threads(threads)
    # transformers resolves its names lazily, and two threads importing it at once can fail
    from transformers import AutoTokenizer  # noqa: F401
    with progress.StatusLine(phase.render) as status, ThreadPoolExecutor(max_workers=jobs) as pool:
        decoded = dict(zip(names, pool.map(decode_system, names)))
    results = {name: d["test"] for name, d in decoded.items()}
    decoder_alone = {name: d["test_decoder"] for name, d in decoded.items()}
    seen = {name: d["test_seen_decoder"] for name, d in decoded.items() if "test_seen_decoder" in d}
    dev = {name: d["dev"] for name, d in decoded.items()}
    real = {name: d["librivox"] for name, d in decoded.items() if "librivox" in d}
    trivial = constant_baseline(corpus)
    # deployment: the last system exported to ONNX, its test split decoded in ONNX Runtime
    deploy_text, deployed = deploy(args.out / names[-1], splits["test"], SYSTEMS[names[-1]][0], args.beam)

    # 4. pictures and the table
    plot_curves(args.out, names)
    plot_alignment.plot_alignment(args.out / names[-1] / "averaged.pt", corpus / "test",
                                  args.out / "alignment.png", beam=args.beam)
    trained = {name: json.loads((args.out / name / "args.json").read_text()) for name in names}
    first = trained[names[0]]
    meta = {"seed": first["seed"], "max_steps": first["max_steps"], "beam": args.beam,
            "weights": {name: (a["acd_weight"], a["lrd_weight"]) for name, a in trained.items()},
            "train_seconds": seconds, "jobs": jobs, "threads": threads,
            "total_seconds": time.perf_counter() - start}
    ci = bootstrap({name: args.out / name / "decode-test" for name in names})
    ci_decoder = bootstrap({name: args.out / name / DECODER_ALONE_DIR for name in names})
    ci_seen = bootstrap({name: args.out / name / SEEN_DECODER_DIR for name in names}) if seen else {}
    text = (table(results, dev, trivial, real, ci, meta) + decoder_table(decoder_alone, ci_decoder, seen, ci_seen)
            + deploy_text)
    extra = {"test_seen_decoder_alone": {"systems": seen, "bootstrap": ci_seen}} if seen else {}
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"systems": results, "dev": dev, "bootstrap": ci, "trivial_constant": trivial, "librivox": real,
         "decoder_alone": {"systems": decoder_alone, "bootstrap": ci_decoder}, "onnx": deployed, **extra, **meta},
        indent=1) + "\n")
    print("\n" + text)
    print(f"demo: wrote {args.out}/results.md, results.json, curves.png, alignment.png")
    return 0

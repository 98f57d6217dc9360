"""Train the CIF-HKD recognizer (cifhkd.model) on a corpus with a cached teacher.

    python python/train_hkd.py --make-demo-corpus    # the demo corpus, HKD (ACD + LRD)
    python python/train_hkd.py --acd-weight 0 --lrd-weight 0 --exp-dir exp/cif   # baseline
    python python/train_hkd.py --corpus data/mine --train-split train.jsonl --valid-split dev.jsonl
    python python/train_hkd.py --config conf.yaml    # keys are option names
    python python/train_hkd.py --resume              # continue from EXP/checkpoint-*.pt
    torchrun --nproc_per_node 2 python/train_hkd.py  # DistributedDataParallel

The splits are --corpus/--train-split and --corpus/--valid-split: Kaldi data dirs
(wav.scp, text) or JSONL manifests (cifhkd.data). The corpus is only read: a missing split is
an error naming the file, unless --make-demo-corpus asks for the demo corpus, which is
then synthesised at --corpus by cifhkd.corpus.make_corpus (which writes only into a new or
empty folder, or a demo corpus it made). cifhkd.teacher_cache.build_cache makes the
vocabulary and the teacher cache at --teacher-dir, or checks them against what they were
built from (cache.json: the manifests' transcripts, the teacher): a stale split cache is
extracted again, and a tokens.txt that is not the training split's vocabulary is an
error (teacher_cache.StaleCacheError), never replaced. When the splits are loaded, a
problem of a manifest or its audio (audio holding NaN, say) is an error naming its line,
and utterances too short for their transcripts (fewer encoder frames than CTC needs) are
reported, then left out (--too-short skip, the default) or refused (--too-short error).
Command-line options override --config.

The loss of an update is the sum of the terms over the tokens of all its micro-batches
(--accum-grad) and all ranks, divided by that token count (the recipe's normalisation).
ACD takes the teacher rows of every rank as negatives (all_gather; only the local
student carries gradients).

An update reads nothing back from the device: batches are prepared on the host
(batch.collate), and the loss terms, gradient norm and finite checks stay on the device
until a check (every --log-every-steps, validation, each save, the end), which stops
training with NonFiniteLossError at the first non-finite update, before anything after it
is saved. On CUDA: bf16 autocast, fused AdamW, DataLoader workers, pinned memory.

EXP/ gets checkpoint-<step>.pt (atomically written and fsynced; model, optimizer,
scheduler, step, epoch, sampler position, every rank's RNG states, and what decoding
needs: model_config, the vocabulary, the tokenizer's identity; other names in EXP, such as
checkpoint-best.pt, are never resumed from, pruned or averaged), averaged.pt (the mean of
the last --average-last checkpoints' weights; decode.py reads it), tensorboard/ (when the
tensorboard package is installed), train_log.jsonl (the same scalars, one line per
--log-every-steps updates; on --resume it continues from the checkpoint's step),
args.json (the options) and run.json, the run's record of the files it wrote
(cifhkd.rundir): no other file of EXP is ever written over or removed. A fresh run into a
folder holding a run, a file of the trainer's names that the run did not write, and
--resume with an option that changes what is trained are refused before anything is
written (rundir's docstring); the record is written once the run has started.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import batch as batch_lib
from . import corpus as corpus_lib
from . import data
from . import dataset as dataset_lib
from . import decode as decode_lib
from . import features
from . import model as model_lib
from . import rundir
from . import sampler as sampler_lib
from . import teacher as teacher_lib
from . import teacher_cache

log = logging.getLogger("train_hkd")

MODEL_FIELDS = [f for f in dataclasses.fields(model_lib.ModelConfig) if f.name != "vocab_size"]


# --- options -------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, help="YAML/JSON file of option defaults (keys: option names, '-' or '_')"
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--corpus",
        type=Path,
        default=Path("data/demo"),
        help="folder of the splits (Kaldi data dirs or JSONL manifests); never written to, "
        "except by --make-demo-corpus",
    )
    g.add_argument(
        "--train-split", default="train", help="--corpus/<this>: a Kaldi data dir, or a JSONL file (train.jsonl)"
    )
    g.add_argument("--valid-split", default="dev", help="as --train-split; '' for no validation")
    g.add_argument(
        "--make-demo-corpus",
        action="store_true",
        help="synthesise the demo corpus (as prepare_demo_corpus.py) at --corpus when its splits "
        "are missing: into a new or empty folder, or an unfinished demo corpus only",
    )
    g.add_argument(
        "--teacher-dir",
        type=Path,
        default=Path("exp/teacher"),
        help="extract_teacher.py output: tokens.txt, <split>-<key>.pt, cache.json (made if missing, "
        "remade where built from other transcripts or another teacher; a tokens.txt that "
        "differs from the training split's vocabulary is an error, never replaced)",
    )
    g.add_argument("--teacher", default=None, help="BERT-like model folder (default MiniLM)")
    g.add_argument("--demo-num-train", type=int, default=12000, help="demo corpus size, with --make-demo-corpus")
    g.add_argument("--demo-num-dev", type=int, default=200)
    g.add_argument(
        "--demo-num-test", type=int, default=200, help="demo test clauses (each spoken by every held-out voice)"
    )
    g.add_argument(
        "--too-short",
        choices=["skip", "error"],
        default="skip",
        help="utterances with fewer encoder frames than their transcripts need (CTC needs "
        "one per token; the fastest --speed-perturb factor counts): 'skip' leaves them "
        "out of the split, 'error' refuses the split; either way their count and the "
        "first ids are reported when the data is loaded",
    )
    g.add_argument("--max-batch-seconds", type=float, default=60.0, help="padded audio per batch")
    g.add_argument("--max-batch-size", type=int, default=10**9)
    g.add_argument("--num-buckets", type=int, default=10)
    g.add_argument(
        "--num-workers",
        type=int,
        default=-1,
        help="DataLoader workers (-1: 4 on CUDA, 0 on the CPU, where they would take the training's cores)",
    )
    g.add_argument("--no-spec-augment", action="store_true")
    sa = features.SpecAugmentConfig()
    g.add_argument("--freq-masks", type=int, default=sa.num_freq_masks, help="SpecAugment")
    g.add_argument(
        "--freq-mask-width", type=int, default=sa.freq_mask_width, help="SpecAugment: widest frequency mask, mel bins"
    )
    g.add_argument("--time-masks", type=int, default=sa.num_time_masks, help="SpecAugment")
    g.add_argument(
        "--time-mask-width",
        type=int,
        default=sa.time_mask_width,
        help="SpecAugment: widest time mask, frames (at most --max-time-ratio x length)",
    )
    g.add_argument("--max-time-ratio", type=float, default=sa.max_time_ratio, help="SpecAugment")
    g.add_argument(
        "--speed-perturb",
        type=float,
        nargs="+",
        default=[],
        help="speed factors drawn per training utterance, e.g. 0.9 1.0 1.1 (Kaldi's speed perturbation; default: none)",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument("--exp-dir", type=Path, default=Path("exp/hkd"))
    g.add_argument("--num-epochs", type=int, default=30)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many updates (0: none)")
    g.add_argument("--peak-lr", type=float, default=1e-3)
    g.add_argument("--init-lr-scale", type=float, default=0.01, help="warmup starts at peak * this")
    g.add_argument("--final-lr-scale", type=float, default=0.05, help="decay ends at peak * this")
    g.add_argument("--warmup-steps", type=int, default=1000)
    g.add_argument("--hold-steps", type=int, default=3000)
    g.add_argument("--decay-steps", type=int, default=6000)
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad-norm", type=float, default=1.0, help="0: no clipping")
    g.add_argument("--accum-grad", type=int, default=1, help="micro-batches per update")
    g.add_argument(
        "--amp",
        choices=["auto", "none", "bf16"],
        default="auto",
        help="bf16 autocast (CUDA only; ignored with a warning on CPU); auto: bf16 on CUDA",
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model's loss (backend: inductor unless named); the CIF "
        "width is then rounded up to a multiple of 8 (fewer shapes to compile). Off by "
        "default: on the demo's 2-core CPU it does not pay (benchmarks/RESULTS.md)",
    )
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every-steps", type=int, default=500)
    g.add_argument("--keep-last", type=int, default=10, help="checkpoints kept (0: all)")
    g.add_argument("--average-last", type=int, default=10, help="K of averaged.pt (0: none)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="checkpoint to resume from; without a value the latest --exp-dir/checkpoint-<step>.pt "
        "(none yet: start afresh). Options that change what is trained must be as the checkpoint "
        "records them (refused otherwise, naming each); those that say how far or how to run "
        "(--max-steps, --num-epochs, --save-every-steps, --keep-last, --average-last, "
        "--log-every-steps, --valid-every-steps, --threads, --num-workers, --device, --compile, "
        "...) may change",
    )
    g.add_argument(
        "--overwrite-exp-dir",
        action="store_true",
        help="start afresh in an --exp-dir that holds a run: first remove the files that run "
        "recorded as its own in EXP/run.json (its checkpoint-<step>.pt, averaged.pt, args.json, "
        "train_log.jsonl, tensorboard/ when it made it, and run.json); no other file",
    )
    g.add_argument("--log-every-steps", type=int, default=10)
    g.add_argument("--valid-every-steps", type=int, default=1000, help="and at the end; 0: end only")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--inject-nan-at-step", type=int, default=0, help=argparse.SUPPRESS)
    g = parser.add_argument_group("model (model.ModelConfig; default: the CPU demo)")
    defaults = model_lib.ModelConfig()
    for f in MODEL_FIELDS:
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            g.add_argument("--" + f.name.replace("_", "-"), type=int, nargs="+", default=value)
        elif isinstance(value, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=value)
        else:
            g.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Command line over --config over the parser's defaults."""
    parser = get_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config is not None:
        text = args.config.read_text()
        if args.config.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {args.config}: unknown option(s) {', '.join(unknown)}")
        for k in ("corpus", "teacher_dir", "exp_dir"):
            if k in values:
                values[k] = Path(values[k])
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def model_config(args, vocab_size: int) -> model_lib.ModelConfig:
    values = {f.name: getattr(args, f.name) for f in MODEL_FIELDS}
    values["pool_after"] = tuple(values["pool_after"])
    return model_lib.ModelConfig(vocab_size=vocab_size, **values)


# --- helpers ---------------------------------------------------------------------------------


def tri_stage_lambda(args):
    """LR factor of peak at update `step` (0-based): linear warmup from init_lr_scale,
    hold at 1, exponential decay to final_lr_scale, then constant (fairseq's tri-stage)."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return args.init_lr_scale + (1 - args.init_lr_scale) * step / args.warmup_steps
        step -= args.warmup_steps
        if step < args.hold_steps:
            return 1.0
        step -= args.hold_steps
        if step < args.decay_steps:
            return math.exp(math.log(args.final_lr_scale) * step / args.decay_steps)
        return args.final_lr_scale

    return factor


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter on rank 0; a no-op elsewhere or without the
    tensorboard package (said once). purge_step: a resumed run's first step (the events of
    the killed session from it on are hidden)."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs")

    def scalars(self, values: Dict[str, float], step: int):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def split_manifests(args) -> Dict[str, Path]:
    """The training and validation splits' manifests: --corpus / <split> (a Kaldi data dir
    or a JSONL file)."""
    return {s: args.corpus / s for s in (args.train_split, args.valid_split) if s}


def ensure_data(args, is_main: bool):
    """Check the corpus; with --make-demo-corpus synthesise the demo corpus when its splits
    are missing; build or check the teacher cache (rank 0; the others wait).

    Nothing of the corpus is ever written without --make-demo-corpus: a missing split is a
    FileNotFoundError naming the file; corpus.make_corpus itself writes only into a new
    or empty folder or a demo corpus it made. The teacher cache is extracted again where it
    was built from other transcripts or another teacher (teacher_cache.build_cache); a
    tokens.txt that differs from the training split's vocabulary is never replaced:
    teacher_cache.StaleCacheError says so."""
    manifests = split_manifests(args)
    if is_main:
        missing = {s: data.missing_manifest_file(m) for s, m in manifests.items()}
        missing = {s: m for s, m in missing.items() if m is not None}
        if missing and args.make_demo_corpus:
            log.info("--make-demo-corpus: no corpus at %s: synthesising the demo corpus", args.corpus)
            corpus_lib.make_corpus(
                args.corpus, num_train=args.demo_num_train, num_dev=args.demo_num_dev, num_test=args.demo_num_test
            )
            missing = {s: data.missing_manifest_file(m) for s, m in manifests.items()}
            missing = {s: m for s, m in missing.items() if m is not None}
        for split, path in missing.items():
            option = "--train-split" if split == args.train_split else "--valid-split"
            hint = (
                ""
                if args.corpus.exists() or args.make_demo_corpus
                else f"; --corpus {args.corpus} does not exist (--make-demo-corpus synthesises the demo corpus there)"
            )
            if split != args.train_split:
                hint += "; --valid-split '' trains without validation"
            raise FileNotFoundError(
                f"train_hkd: {option} {split}: {path} is missing (a split is a Kaldi "
                f"data dir with wav.scp and text, or a JSONL manifest, in --corpus)" + hint
            )
        teacher_cache.build_cache(
            args.teacher_dir, manifests[args.train_split], list(manifests.values()), args.teacher, log=log.info
        )
    if dist.is_initialized():
        dist.barrier()


def load_split(
    args, split: str, vocab, tokenizer, need_teacher: bool, train: bool, config: Optional[model_lib.ModelConfig] = None
):
    """One split's AsrDataset; SpecAugment and speed perturbation on the training split only.
    Problems of the manifest or its audio are errors naming its lines (data.load_manifest);
    with config, utterances too short for their transcripts are reported, then skipped or
    refused (--too-short: skip_too_short)."""
    manifest = args.corpus / split
    utts, _ = data.load_manifest(manifest)
    states = teacher_cache.load_states(args.teacher_dir, manifest, args.teacher) if need_teacher else None
    spec_augment = None
    if train and not args.no_spec_augment:
        spec_augment = features.SpecAugment(
            features.SpecAugmentConfig(
                num_freq_masks=args.freq_masks,
                freq_mask_width=args.freq_mask_width,
                num_time_masks=args.time_masks,
                time_mask_width=args.time_mask_width,
                max_time_ratio=args.max_time_ratio,
            )
        )
    dataset = dataset_lib.AsrDataset(
        utts, vocab, tokenizer, states, spec_augment, seed=args.seed, speed_perturb=args.speed_perturb if train else ()
    )
    if config is not None:
        skip_too_short(dataset, manifest, config, args.too_short)
    return dataset


def too_short(
    dataset: dataset_lib.AsrDataset, config: model_lib.ModelConfig, speed_perturb: Sequence[float] = ()
) -> List[int]:
    """Indices of the dataset's utterances with fewer encoder frames than
    dataset.min_encoder_frames (the frames counted for the fastest speed_perturb factor,
    which shortens the audio most; samples at 16 kHz rounded as soxr rounds them)."""
    fastest = max(speed_perturb, default=1.0)
    short = []
    for i, utt in enumerate(dataset.utterances):
        samples = math.floor(math.floor(utt.duration * features.SAMPLE_RATE + 0.5) / fastest + 0.5)
        frames = model_lib.encoder_length(features.num_fbank_frames(samples), config)
        if frames < dataset_lib.min_encoder_frames(dataset.tokens[i], config.ctc_weight > 0):
            short.append(i)
    return short


def skip_too_short(
    dataset: dataset_lib.AsrDataset, manifest: Path, config: model_lib.ModelConfig, policy: str = "skip", show: int = 5
) -> List[str]:
    """Report the utterances of dataset too short for their transcripts (too_short:
    a count and the first `show`, with their manifest lines), then drop them (policy
    "skip") or raise data.ManifestError ("error"). Returns their ids."""
    short = too_short(dataset, config, dataset.speed_perturb)
    if not short:
        return []
    examples = []
    for i in short[:show]:
        utt, tokens = dataset.utterances[i], dataset.tokens[i]
        examples.append(
            f"{utt.id} ({utt.source}: {utt.duration:.2f} s for {len(tokens)} tokens, "
            f"needs {dataset_lib.min_encoder_frames(tokens, config.ctc_weight > 0)} "
            "encoder frames)"
        )
    speed = (
        f" at speed {max(dataset.speed_perturb)}" if dataset.speed_perturb and max(dataset.speed_perturb) != 1.0 else ""
    )
    need = "CTC needs: one per token, one more between repeated tokens" if config.ctc_weight > 0 else "one"
    message = (
        f"{manifest}: {len(short)} of {len(dataset)} utterance(s) too short for their "
        f"transcripts (fewer encoder frames{speed} than {need}): "
        + "; ".join(examples)
        + ("; ..." if len(short) > show else "")
    )
    if policy == "error":
        raise data.ManifestError(message + "; --too-short skip leaves them out")
    if policy != "skip":
        raise ValueError(f"skip_too_short: policy must be 'skip' or 'error', got {policy!r}")
    ids = [dataset.utterances[i].id for i in short]
    dataset.drop(short)
    if not len(dataset):
        raise data.ManifestError(message + "; no utterance is left")
    log.warning("%s; skipped (--too-short error refuses them)", message)
    return ids


def make_gather_teacher(world_size: int, rank: int):
    """model.GatherTeacher over all ranks (rows are padded to the longest, then cut)."""

    def gather(local: torch.Tensor):
        count = torch.tensor([local.shape[0]], device=local.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        padded = F.pad(local.detach(), (0, 0, 0, max(counts) - local.shape[0])).contiguous()
        rows = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(rows, padded)
        return torch.cat([r[:c] for r, c in zip(rows, counts)]), sum(counts[:rank])

    return gather


def autocast(args, device):
    if args.amp in ("bf16", "auto") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def term_values(loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss, *terms] as one float64 tensor on their device (no synchronisation)."""
    return torch.stack([loss.detach().double(), *(v.double() for v in terms.values())])


@torch.no_grad()
def validate(model, valid_set, args, device) -> Dict[str, float]:
    """Per-token dev losses (no dropout, no SpecAugment), on every rank's full dev set;
    read back from the device once."""
    model.eval()
    sampler = sampler_lib.BucketBatchSampler(
        [u.duration for u in valid_set.utterances], args.max_batch_seconds, shuffle=False
    )
    totals, names, tokens = None, [], 0
    for indices in sampler:
        batch = batch_lib.collate([valid_set[i] for i in indices]).to(device, non_blocking=True)
        with autocast(args, device):
            loss, terms, num_tokens = model.compute_loss(batch)
        tokens += num_tokens
        names = ["loss", *terms]
        values = term_values(loss, terms)
        totals = values if totals is None else totals + values
    model.train()
    return {} if totals is None else {k: v / max(tokens, 1) for k, v in zip(names, totals.tolist())}


def make_optimizer(model, args, device) -> torch.optim.Optimizer:
    """AdamW: decoupled weight decay, as fairseq's "adam" that the authors' recipe uses;
    fused on CUDA (one kernel for every parameter, the step count kept on the device)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=args.peak_lr,
        betas=tuple(args.adam_betas),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        fused=True if device.type == "cuda" else None,
    )


def train_update(
    net,
    forward,
    model,
    optimizer,
    update: List[batch_lib.Batch],
    args,
    device,
    *,
    scale,
    gather_teacher=None,
    inject_nan: bool = False,
):
    """One update: forward and backward of its micro-batches (`forward`: net, or net
    compiled; DDP synchronises the gradients on the last), clipping, the optimizer step.
    Reads nothing back from the device. scale: the loss factor (a float, or a tensor on
    the device). -> (term names, their sums [loss, *terms] on the device, the gradient
    norm)."""
    optimizer.zero_grad(set_to_none=True)
    sums = None
    for i, batch in enumerate(update):
        batch = batch.to(device, non_blocking=True)
        last = i == len(update) - 1
        with net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext():
            with autocast(args, device):
                loss, terms, _ = forward(batch, gather_teacher)
            if inject_nan:
                loss = loss * float("nan")
            (loss * scale).backward()
        values = term_values(loss, terms)
        sums = values if sums is None else sums + values
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf")
    )
    optimizer.step()
    return ["loss", *terms], sums, grad_norm


class NonFiniteLossError(FloatingPointError):
    pass


class LossMonitor:
    """The loss terms and gradient norm of the last update, and the values of the first
    update with a non-finite one, kept on the device: record() every update costs no
    synchronisation; check() reads them back (on every rank together: it reduces over
    ranks) and raises NonFiniteLossError when an update since the start was not finite."""

    NONE = 2**62  # first_step before anything was non-finite

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank
        self.names: List[str] = []
        self.last = self.first_step = self.first_values = None
        self.checked_step = 0

    def record(self, step: int, names: List[str], sums: torch.Tensor, grad_norm: torch.Tensor):
        """sums: term_values summed over the update's micro-batches (this rank's)."""
        values = torch.cat([sums, grad_norm.detach().double().reshape(1)])
        if self.last is None:
            self.names = [*names, "grad_norm"]
            self.first_step = torch.full((), self.NONE, dtype=torch.int64, device=values.device)
            self.first_values = torch.zeros_like(values)
        new = (~torch.isfinite(values)).any() & (self.first_step == self.NONE)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_values = torch.where(new, values, self.first_values)
        self.last = values

    def check(
        self,
        step: int,
        epoch: int,
        last_saved: Optional[int],
        reduce: bool = True,
        cause: Optional[BaseException] = None,
    ) -> Dict[str, float]:
        """The last update's values ({name: sum over ranks}, grad_norm as is); raises
        NonFiniteLossError naming the first non-finite update's step and terms (from
        `cause`, when an error of a later step led here). reduce=False: this rank's values,
        no collective (for a rank that failed on its own)."""
        if self.last is None:
            return {}
        last, first_step, first_values = self.last.clone(), self.first_step.clone(), self.first_values
        if self.world_size > 1 and reduce:
            dist.all_reduce(last[:-1])  # the gradient norm is every rank's
            local = first_step.clone()
            dist.all_reduce(first_step, op=dist.ReduceOp.MIN)
            first_values = torch.where(local == first_step, first_values, torch.zeros_like(first_values))
            dist.all_reduce(first_values[:-1])
        checked, self.checked_step = self.checked_step, step
        bad_step = int(first_step)
        if bad_step != self.NONE:
            values = dict(zip(self.names, first_values.tolist()))
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"train_hkd: non-finite {bad[0]} {values[bad[0]]} at step {bad_step} (of steps "
                f"{checked + 1}-{step}, read back together; epoch {epoch}, rank {self.rank}"
                + (", values summed over ranks" if self.world_size > 1 and reduce else "")
                + f"); non-finite: {', '.join(bad)}; that step's values "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + (
                    "; no checkpoint was written"
                    if last_saved is None
                    else f"; the last checkpoint, written before it, is checkpoint-{last_saved}.pt"
                )
            ) from cause
        return dict(zip(self.names, last.tolist()))


# --- training: the steps of run() ----------------------------------------------------------


@dataclasses.dataclass
class Process:
    """This process's place in the run: rank and world size (torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK; one process without them) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class Position:
    """Where training is: updates done, the epoch, this rank's batches done in the epoch
    (what a checkpoint saves and --resume restores), and the last checkpoint written: its
    step on every rank (save_checkpoint is collective: every rank must agree on whether to
    save), its path on rank 0 only."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    last_saved: Optional[int] = None
    last_path: Optional[Path] = None
    resumed_from: Optional[Path] = None


@dataclasses.dataclass
class Throughput:
    """Wall time of the updates and utterances trained (all ranks), for the logs."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    utterances: int = 0
    step_seconds: List[float] = dataclasses.field(default_factory=list)

    def utterances_per_s(self) -> float:
        return self.utterances / (time.perf_counter() - self.start)


def setup_process(args) -> Process:
    """The device (--device; on CUDA the LOCAL_RANK-th GPU), the process group of a
    distributed run (nccl on CUDA, gloo on the CPU), --threads and the logging."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s"
    )
    if args.amp == "bf16" and device.type != "cuda":
        log.warning("--amp bf16 is for CUDA only; training in float32 on %s", device)
    return Process(rank, world_size, device)


def load_data(args, proc: Process):
    """ensure_data, the seeds, then the vocabulary, the model config and the splits.
    -> (config, vocabulary, training set, validation set or None, the training batch sampler)"""
    ensure_data(args, proc.is_main)
    seed_everything(args.seed + proc.rank)
    vocab = teacher_lib.TokenVocab.load(args.teacher_dir / "tokens.txt")
    tokenizer = teacher_lib.load_tokenizer(args.teacher)
    config = model_config(args, len(vocab))
    need_teacher = config.acd_weight > 0 or config.lrd_weight > 0
    train_set = load_split(args, args.train_split, vocab, tokenizer, need_teacher, train=True, config=config)
    valid_set = (
        load_split(args, args.valid_split, vocab, tokenizer, need_teacher, train=False, config=config)
        if args.valid_split
        else None
    )
    sampler = sampler_lib.BucketBatchSampler(
        [u.duration for u in train_set.utterances],
        args.max_batch_seconds,
        max_batch_size=args.max_batch_size,
        num_buckets=args.num_buckets,
        seed=args.seed,
    )
    if len(sampler) < proc.world_size:
        raise ValueError(f"train_hkd: {len(sampler)} batches per epoch for {proc.world_size} ranks")
    return config, vocab, train_set, valid_set, sampler


@dataclasses.dataclass
class Training:
    """The training loop's objects: what run() builds and its steps (load_checkpoint,
    train_step, log_train, save_checkpoint, finish) share. net: DistributedDataParallel
    over model on several ranks, else model; forward: net, or net compiled (--compile);
    gather_teacher: ACD's extra negatives (the other ranks' teacher rows, the
    TeacherBank), or None."""

    args: argparse.Namespace
    proc: Process
    model: model_lib.CifHkdModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: sampler_lib.BucketBatchSampler
    run_dir: rundir.RunDir
    decoding: dict  # decode.decoding_record: what a checkpoint gives decoding
    pos: Position = dataclasses.field(default_factory=Position)
    net: Optional[torch.nn.Module] = None
    forward: Optional[Callable] = None
    gather_teacher: Optional[Callable] = None
    monitor: LossMonitor = dataclasses.field(init=False)

    def __post_init__(self):
        self.monitor = LossMonitor(self.proc.world_size, self.proc.rank)


def build_model(args, config: model_lib.ModelConfig, proc: Process):
    """The model (the same initial weights on every rank), AdamW and the tri-stage
    schedule. -> (model, optimizer, scheduler)"""
    torch.manual_seed(args.seed)
    model = model_lib.CifHkdModel(config).to(proc.device)
    torch.manual_seed(args.seed + proc.rank)
    optimizer = make_optimizer(model, args, proc.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tri_stage_lambda(args))
    return model, optimizer, scheduler


def wrap_model(t: Training, train_set: dataset_lib.AsrDataset):
    """Sets t.net, t.forward and t.gather_teacher (see Training)."""
    args, proc, config = t.args, t.proc, t.model.config
    # ACD/LRD heads (and the CTC head) may be unused when their weights are 0
    unused = any(getattr(config, w) == 0 for w in ("ctc_weight", "acd_weight", "lrd_weight", "ce_weight"))
    t.net = (
        DistributedDataParallel(
            t.model, device_ids=[proc.device] if proc.device.type == "cuda" else None, find_unused_parameters=unused
        )
        if proc.world_size > 1
        else t.model
    )
    t.gather_teacher = make_gather_teacher(proc.world_size, proc.rank) if proc.world_size > 1 else None
    if config.acd_weight > 0 and config.acd_bank > 0:  # ACD's cached negatives (model.TeacherBank)
        t.gather_teacher = model_lib.TeacherBank.from_states(
            {u.id: train_set.teacher_states[u.id] for u in train_set.utterances},
            config.acd_bank,
            args.seed,
            proc.device,
            t.gather_teacher,
        )
    t.forward = t.net if args.compile is None else torch.compile(t.net, backend=args.compile)


def load_checkpoint(t: Training):
    """With --resume, restore the checkpoint (without a value the latest
    EXP/checkpoint-<step>.pt; none: start afresh) into the model, optimizer, scheduler,
    sampler and this rank's RNGs, after removing what killed saves left; sets t.pos (step 0
    afresh). Options that change what is trained must be those the checkpoint (afresh: the
    run's args.json) records (rundir.RunDir.check_options)."""
    args, proc = t.args, t.proc
    resume = args.resume
    if resume is not None and proc.is_main:
        rundir.remove_stale_temporaries(args.exp_dir, log=log.info)
    if resume == "latest":
        found = rundir.list_checkpoints(args.exp_dir)
        resume = found[-1] if found else None
        if resume is None:
            log.info("--resume: no checkpoint in %s, starting afresh", args.exp_dir)
    defaults = vars(get_parser().parse_args([]))
    if resume is None:
        if args.resume is not None:
            t.run_dir.check_options(vars(args), t.run_dir.recorded_options(), defaults, f"{args.exp_dir / rundir.ARGS}")
        t.pos = Position()
        return
    resume = Path(resume)
    if not resume.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    state = torch.load(resume, map_location="cpu", weights_only=False)
    recorded = state.get("args") if isinstance(state, dict) else None
    t.run_dir.check_options(vars(args), recorded if isinstance(recorded, dict) else None, defaults, str(resume))
    if state["world_size"] != proc.world_size:
        raise ValueError(f"--resume {resume}: saved with {state['world_size']} ranks, running with {proc.world_size}")
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.sampler.load_state_dict(state["sampler"])
    t.pos = Position(
        state["step"], state["epoch"], state["sampler"]["batches_done"] // proc.world_size, resumed_from=resume
    )
    rundir.set_rng_state(state["rng"][proc.rank])
    log.info("resumed from %s at step %d, epoch %d, batch %d", resume, t.pos.step, t.pos.epoch, t.pos.batches_done)


def save_checkpoint(t: Training) -> Optional[Path]:
    """EXP/checkpoint-<step>.pt (rundir.atomic_save, recorded as the run's first; every
    rank's RNG states, gathered: every rank calls this; t.decoding: decode.decoding_record's
    vocabulary and tokenizer), then the run's oldest beyond --keep-last removed. Sets
    pos.last_saved on every rank, pos.last_path on rank 0. -> its path (rank 0), or None."""
    args, proc, pos = t.args, t.proc, t.pos
    pos.last_saved = pos.step
    rngs = [None] * proc.world_size
    if proc.world_size > 1:
        dist.all_gather_object(rngs, rundir.rng_state())
    else:
        rngs = [rundir.rng_state()]
    if not proc.is_main:
        return None
    path = args.exp_dir / f"checkpoint-{pos.step}.pt"
    rundir.remove_stale_temporaries(args.exp_dir, log=log.info)
    t.run_dir.claim(path.name)
    rundir.atomic_save(
        {
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "step": pos.step,
            "epoch": pos.epoch,
            "sampler": {"epoch": pos.epoch, "seed": t.sampler.seed, "batches_done": pos.batches_done * proc.world_size},
            "rng": rngs,
            "world_size": proc.world_size,
            "args": vars(args),
            "model_config": dataclasses.asdict(t.model.config),
            **t.decoding,
        },
        path,
    )
    pos.last_path = path
    if args.keep_last > 0:
        for old in t.run_dir.checkpoints()[: -args.keep_last]:
            t.run_dir.release(old)
    return path


def micro_batches(t: Training, train_set: dataset_lib.AsrDataset) -> Iterator[batch_lib.Batch]:
    """This rank's batches from t.pos (epoch, batches_done) to the end of --num-epochs,
    advancing t.pos as they are taken."""
    args, proc, pos = t.args, t.proc, t.pos
    collate = functools.partial(batch_lib.collate, token_multiple=1 if args.compile is None else 8)
    num_workers = args.num_workers if args.num_workers >= 0 else (4 if proc.device.type == "cuda" else 0)
    while pos.epoch < args.num_epochs:
        t.sampler.set_epoch(pos.epoch)
        train_set.epoch = pos.epoch
        mine = sampler_lib.rank_batches(t.sampler, proc.rank, proc.world_size)
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_sampler=mine[pos.batches_done :],
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=proc.device.type == "cuda",
            # its own seed source: a loader drawing from the
            # global RNG would shift dropout after --resume
            generator=torch.Generator().manual_seed(args.seed + pos.epoch),
        )
        for batch in loader:
            pos.batches_done += 1
            yield batch
        pos.epoch, pos.batches_done = pos.epoch + 1, 0


def next_update(stream: Iterator[batch_lib.Batch], accum_grad: int) -> Optional[List[batch_lib.Batch]]:
    """The next accum_grad micro-batches, or None when the data runs out (a last partial
    update is dropped)."""
    update = []
    for batch in stream:
        update.append(batch)
        if len(update) == accum_grad:
            return update
    return None


def loss_scale(update: List[batch_lib.Batch], proc: Process):
    """The loss normaliser of an update: its tokens (+ [SEP]) over all ranks, counted from
    the batches' lengths on the host. -> (the count, the loss factor world_size / count:
    DDP averages gradients over ranks; a tensor on the device on several ranks)"""
    num_tokens = sum(int((b.token_lens + 1).sum()) for b in update)
    if proc.world_size == 1:
        return num_tokens, 1 / float(num_tokens)
    count = torch.tensor(float(num_tokens), dtype=torch.float64, device=proc.device)
    dist.all_reduce(count)
    return count, (proc.world_size / count).float()


def train_step(t: Training, update: List[batch_lib.Batch]):
    """One update (train_update), the schedule's step, pos.step + 1, its values recorded in
    t.monitor (on the device). An error in the update first reports an earlier non-finite
    update (on the CPU, weights made NaN by an update not yet checked fail in cifops.cif).
    -> the update's token count over all ranks (the loss normaliser)"""
    args, pos = t.args, t.pos
    count, scale = loss_scale(update, t.proc)
    try:
        names, sums, grad_norm = train_update(
            t.net,
            t.forward,
            t.model,
            t.optimizer,
            update,
            args,
            t.proc.device,
            scale=scale,
            gather_teacher=t.gather_teacher,
            inject_nan=args.inject_nan_at_step == pos.step + 1,
        )
    except Exception as e:
        t.monitor.check(pos.step, pos.epoch, pos.last_saved, reduce=False, cause=e)
        raise
    t.scheduler.step()
    pos.step += 1
    t.monitor.record(pos.step, names, sums, grad_norm)
    return count


def log_train(t: Training, values: Dict[str, float], count, speed: Throughput, board: "TensorBoard", progress):
    """The checked values of the last update, per token: the progress bar, TensorBoard and
    EXP/train_log.jsonl."""
    pos, lr = t.pos, t.scheduler.get_last_lr()[0]
    values = dict(values)
    grad = values.pop("grad_norm")
    per_token = {k: v / float(count) for k, v in values.items()}
    rate = speed.utterances_per_s()
    progress.set_postfix({**{k: f"{v:.3f}" for k, v in per_token.items()}, "utt/s": f"{rate:.1f}"})
    board.scalars({f"train/{k}": v for k, v in per_token.items()}, pos.step)
    board.scalars(
        {
            "train/lr": lr,
            "train/grad_norm": grad,
            "train/utterances_per_s": rate,
            "train/step_s": speed.step_seconds[-1],
        },
        pos.step,
    )
    if t.proc.is_main:
        with open(t.args.exp_dir / rundir.LOG, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": pos.step,
                        "epoch": pos.epoch,
                        **per_token,
                        "lr": lr,
                        "grad_norm": grad,
                        "step_s": round(speed.step_seconds[-1], 4),
                    }
                )
                + "\n"
            )


def finish(t: Training, valid_set, speed: Throughput, board: "TensorBoard"):
    """The end, after the last checkpoint: the final validation, averaged.pt (the last
    --average-last of the run's checkpoints), the timing summary (rank 0); every rank waits
    for it."""
    args, proc, pos = t.args, t.proc, t.pos
    if proc.is_main:
        if valid_set is not None:
            valid = validate(t.model, valid_set, args, proc.device)
            board.scalars({f"valid/{k}": v for k, v in valid.items()}, pos.step)
            log.info("valid at step %d: %s", pos.step, ", ".join(f"{k} {v:.4f}" for k, v in valid.items()))
        if args.average_last > 0:
            paths = t.run_dir.checkpoints()[-args.average_last :]
            t.run_dir.claim(rundir.AVERAGED)
            rundir.average_checkpoints(paths, args.exp_dir / rundir.AVERAGED)
            log.info("averaged %d checkpoint(s) -> %s", len(paths), args.exp_dir / rundir.AVERAGED)
        if speed.step_seconds:
            timed = speed.step_seconds[1:] or speed.step_seconds
            log.info(
                "%d steps; median step %.3f s; %.1f utterances/s",
                len(speed.step_seconds),
                float(np.median(timed)),
                speed.utterances_per_s(),
            )
    board.close()
    if proc.world_size > 1:
        dist.barrier()


def run(args) -> Optional[Path]:
    """Train; returns the last checkpoint's path (rank 0) or None.

    Nothing is read back from the device between checks: logging, validation, saving
    and the end (LossMonitor)."""
    proc = setup_process(args)
    run_dir = rundir.RunDir.read(args.exp_dir).check(args)  # refuses before anything is done
    config, vocab, train_set, valid_set, sampler = load_data(args, proc)
    t = Training(
        args, proc, *build_model(args, config, proc), sampler, run_dir, decode_lib.decoding_record(vocab, args.teacher)
    )
    load_checkpoint(t)
    pos = t.pos
    run_dir.start(args, pos.step, pos.resumed_from, proc.is_main, log=log.info)  # the record, now
    log.info(
        "model: %.2f M parameters, vocabulary %d, %d training utterances, %d batches/epoch, %d rank(s) on %s",
        model_lib.count_parameters(t.model) / 1e6,
        config.vocab_size,
        len(train_set),
        len(sampler),
        proc.world_size,
        proc.device,
    )
    wrap_model(t, train_set)
    board = TensorBoard(args.exp_dir / rundir.BOARD, proc.is_main, purge_step=pos.step + 1 if pos.step else None)
    from tqdm import tqdm

    progress = tqdm(
        total=args.max_steps or None,
        initial=pos.step,
        disable=not proc.is_main or args.no_progress,
        dynamic_ncols=True,
        desc="train",
    )
    t.model.train()
    stream = micro_batches(t, train_set)
    speed = Throughput()
    while not (args.max_steps and pos.step >= args.max_steps):
        update = next_update(stream, args.accum_grad)
        if update is None:
            break
        step_start = time.perf_counter()
        count = train_step(t, update)
        speed.utterances += sum(b.feats.shape[0] for b in update) * proc.world_size
        speed.step_seconds.append(time.perf_counter() - step_start)
        progress.update(1)
        log_now = pos.step % args.log_every_steps == 0 or pos.step == 1
        valid_now = valid_set is not None and args.valid_every_steps and pos.step % args.valid_every_steps == 0
        save_now = args.save_every_steps and pos.step % args.save_every_steps == 0
        if log_now or valid_now or save_now:
            # raises before anything is saved after a non-finite update
            values = t.monitor.check(pos.step, pos.epoch, pos.last_saved)
            if log_now:
                log_train(t, values, count, speed, board, progress)
        if valid_now and proc.is_main:
            board.scalars(
                {f"valid/{k}": v for k, v in validate(t.model, valid_set, args, proc.device).items()}, pos.step
            )
        if save_now:
            save_checkpoint(t)
    progress.close()
    t.monitor.check(pos.step, pos.epoch, pos.last_saved)
    if pos.last_saved != pos.step:  # the same on every rank: save_checkpoint is collective
        save_checkpoint(t)
    finish(t, valid_set, speed, board)
    rundir.release_locks()
    return pos.last_path if proc.is_main else None


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        rundir.release_locks()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # python -m cifhkd.train: how demo.py runs each system
    main()

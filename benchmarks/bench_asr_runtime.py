"""Real-time factor of CIF-HKD transcription: PyTorch eager against ONNX Runtime float32
and int8 (cifhkd.export, cifhkd.onnx_asr), in the same run.

    OMP_WAIT_POLICY=PASSIVE CIFHKD_BENCH_CHECKPOINT=exp/demo/hkd/averaged.pt \\
        CIFHKD_BENCH_SPLIT=data/demo/test \\
        pytest benchmarks/bench_asr_runtime.py --benchmark-only -p no:cacheprovider
    python benchmarks/summarize.py last.json --baseline pytorch

Every benchmark transcribes the same utterances, their samples in memory (the files are
read before timing): fbank and CMVN, the encoder, decode.py's search, batched by
duration as decode.py batches them (120 s of padded audio a batch). Searches: beam 10
and greedy (a beam of one), both with decode.py's count search (+-2) and the CTC weight
(0.3 for a model trained with CTC). Threads: 1 and 2 (torch.set_num_threads; ONNX
Runtime's intra_op_num_threads, one inter-op thread, no spinning). Run it with
OMP_WAIT_POLICY=PASSIVE in the environment, so that PyTorch's OpenMP threads do not
busy-wait either, as OnnxRecognizer's threads do not (extra_info records the policy):
with spinning threads on the shared 2-core VM, 2-thread PyTorch was 10-20x slower than 1-thread.
PyTorch runs decode.beam_search on the checkpoint; ONNX Runtime runs OnnxRecognizer on
its export (made once per run, in a temporary folder, with --int8). extra_info: rtf
(median seconds / audio seconds), the audio seconds, and the share of utterances whose
hypothesis is PyTorch's.

The model is CIFHKD_BENCH_CHECKPOINT (with CIFHKD_BENCH_ONNX, when set, its export made
with --int8, used instead of exporting it again: checked against the checkpoint's
sha256), else the demo's model (ModelConfig(), the demo's 298-piece vocabulary) with
random weights; the audio is the first CIFHKD_BENCH_UTTERANCES (default 40) utterances
of CIFHKD_BENCH_SPLIT, else random noise of the demo's utterance lengths. With
--benchmark-disable (CI's smoke run of the benchmarks) a tiny random model and two short
noise clips are transcribed once each: the code runs, nothing is measured.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the onnx extra)")
pytest.importorskip("onnxscript", reason="the export needs onnxscript (the export extra)")
pytest.importorskip("kaldi_native_fbank", reason="needs the train extra")

from cifhkd import data, decode, export, features, onnx_asr  # noqa: E402
from cifhkd import model as model_lib  # noqa: E402
from cifhkd import sampler as sampler_lib  # noqa: E402

DEMO_VOCAB = 298
BACKENDS = ["pytorch", "ort_fp32", "ort_int8"]
SEARCHES = {"beam10": 10, "greedy": 1}
THREADS = [1, 2]


def _vocab_file(folder: Path, size: int) -> Path:
    """A tokens.txt of `size` pieces: blank, [SEP], [UNK], then made-up pieces."""
    path = folder / "tokens.txt"
    path.write_text(
        "".join(f"{t} {i}\n" for i, t in enumerate(["<blank>", "[SEP]", "[UNK]"] + [f"w{i}" for i in range(size - 3)]))
    )
    return path


def _random_checkpoint(folder: Path, config: model_lib.ModelConfig) -> Path:
    torch.manual_seed(0)
    model = model_lib.CifHkdModel(config)
    path = folder / "random.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": dataclasses.asdict(config),
            "vocab": str(_vocab_file(folder, config.vocab_size)),
        },
        path,
    )
    return path


def _noise(durations):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32) for d in durations]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pytestconfig):
    folder = tmp_path_factory.mktemp("asr_runtime")
    smoke = pytestconfig.getoption("benchmark_disable")
    checkpoint = os.environ.get("CIFHKD_BENCH_CHECKPOINT")
    if smoke:
        config = model_lib.ModelConfig(
            vocab_size=20,
            d_model=32,
            num_heads=4,
            ffn_dim=64,
            num_layers=2,
            pool_after=(1, 2),
            conv_kernel=5,
            subsampling_channels=8,
            decoder_layers=1,
            decoder_heads=4,
            decoder_ffn_dim=64,
        )
        checkpoint = _random_checkpoint(folder, config)
    elif checkpoint is None:
        checkpoint = _random_checkpoint(folder, model_lib.ModelConfig(vocab_size=DEMO_VOCAB))
    split = os.environ.get("CIFHKD_BENCH_SPLIT")
    if smoke:
        samples = _noise([0.6, 0.9])
    elif split:
        utts, _ = data.load_manifest(split)
        samples = [data.load_audio(u.audio) for u in utts[: int(os.environ.get("CIFHKD_BENCH_UTTERANCES", 40))]]
    else:
        samples = _noise(np.random.default_rng(1).uniform(1.0, 3.5, 40))
    model = decode.load_checkpoint(Path(checkpoint)).model
    exported = os.environ.get("CIFHKD_BENCH_ONNX") if not smoke else None
    if exported:
        config = onnx_asr.read_export(exported, int8=True)
        if config["source"]["checkpoint_sha256"] != data.sha256_file(checkpoint):
            raise ValueError(f"CIFHKD_BENCH_ONNX {exported} is not an export of {checkpoint}")
    else:
        exported = export.export(checkpoint, folder / "onnx", int8=True, log=lambda line: None)
    return {
        "model": model,
        "onnx": exported,
        "samples": samples,
        "recognizers": {},
        "audio_s": sum(len(s) for s in samples) / 16000,
        "reference": {},
    }


def pytorch_decode(model, samples, beam):
    """decode.decode's PyTorch path on samples in memory: -> [(ids, fire frames)]."""
    durations = [len(s) / 16000 for s in samples]
    results = [None] * len(samples)
    for indices in sampler_lib.BucketBatchSampler(durations, decode.MAX_BATCH_SECONDS, shuffle=False):
        feats = [features.utterance_cmvn(features.compute_fbank(samples[i])) for i in indices]
        lens = torch.tensor([len(f) for f in feats])
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        for i, result in zip(indices, decode.beam_search(model, padded, lens, beam)):
            results[i] = result
    return results


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_asr_runtime(benchmark, setup, backend, search, threads):
    beam = SEARCHES[search]
    samples = setup["samples"]
    benchmark.group = f"CIF-HKD transcription, CPU, {search}, {threads} thread(s)"
    benchmark.extra_info.update(
        {
            "impl": backend,
            "threads": threads,
            "beam": beam,
            "audio_s": setup["audio_s"],
            "utterances": len(samples),
            "onnxruntime": ort.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        }
    )
    if backend == "pytorch":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                run = lambda: pytorch_decode(setup["model"], samples, beam)  # noqa: E731
                results = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
        finally:
            torch.set_num_threads(previous)
        setup["reference"][search] = results
    else:
        key = (backend, search, threads)
        if key not in setup["recognizers"]:
            setup["recognizers"][key] = onnx_asr.OnnxRecognizer(
                setup["onnx"], int8=backend == "ort_int8", beam=beam, threads=threads
            )
        asr = setup["recognizers"][key]
        results = benchmark.pedantic(lambda: asr.decode_samples(samples), rounds=3, iterations=1, warmup_rounds=1)
        reference = setup["reference"].get(search)
        if reference is not None:
            benchmark.extra_info["same_hypothesis"] = sum(a[0] == b[0] for a, b in zip(results, reference)) / len(
                samples
            )
    assert len(results) == len(samples)
    if benchmark.stats is not None:
        benchmark.extra_info["rtf"] = benchmark.stats.stats.median / setup["audio_s"]

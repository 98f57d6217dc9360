"""Streaming CIF: the cost of one chunk, cifops.cif_stream_step against FunASR's streaming
Paraformer predictor.

    pytest benchmarks/bench_stream.py --benchmark-json=stream.json
    python benchmarks/summarize.py stream.json

One chunk of Tc = 16 frames (100-640 ms of audio at the usual 6-40 ms frame rates),
D = 512, B = 1 (one live stream) and B = 32 (a server's batch), in the middle of a stream
(the state carries a partial token). Two comparisons:
  - "step": cifops.cif_stream_step alone, the CIF part of a streaming step;
  - "predictor": FunASR's CifPredictorV2.forward_chunk (its alpha layers, then a Python
    loop over frames with the residual cached as a pseudo-frame; one stream at a time:
    with B > 1 its cache does not concatenate), against the same
    module's alpha layers followed by cifops.cif_stream_step (exact across chunks).
On CUDA each timed call ends with a synchronisation.
"""

import pytest
import torch

import cifops

from peers import _funasr

TC, D = 16, 512
CUDA = torch.cuda.is_available()
CASES = [(device, B) for device in (["cpu", "cuda"] if CUDA else ["cpu"]) for B in (1, 32)]


def _id(case):
    return f"{case[0]}-B{case[1]}"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _chunk(B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, TC, D, generator=g).to(device)
    alphas = (torch.rand(B, TC, generator=g) * 0.6).to(device)
    return hidden, alphas


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_stream_step(benchmark, case):
    device, B = case
    hidden, alphas = _chunk(B, device)
    _, state = cifops.cif_stream_step(hidden, alphas, max_tokens=TC)  # mid-stream state

    def step():
        out = cifops.cif_stream_step(hidden, alphas, None, state, max_tokens=TC)
        _sync(device)
        return out

    out, _ = step()
    assert out.embeds.shape == (B, TC, D)
    benchmark.group = f"cif stream step {device} B={B} Tc={TC} D={D}"
    benchmark.extra_info.update(impl="cifops", device=device, threads=torch.get_num_threads())
    benchmark(step)


def _predictor(device):
    try:
        cp = _funasr()
    except ImportError:
        pytest.skip("FunASR is not installed")
    torch.manual_seed(0)
    return cp.CifPredictorV2(D, 1, 1, tail_threshold=0.45).to(device).eval()


def _alphas_of(pred, hidden):
    """CifPredictorV2's alpha layers, as forward_chunk computes them."""
    out = torch.relu(pred.cif_conv1d(pred.pad(hidden.transpose(1, 2)))).transpose(1, 2)
    alphas = torch.sigmoid(pred.cif_output(out))
    return torch.relu(alphas * pred.smooth_factor - pred.noise_threshold).squeeze(-1)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("impl", ["funasr_forward_chunk", "cifops"])
def test_stream_predictor_chunk(benchmark, impl, case):
    device, B = case
    if impl == "funasr_forward_chunk" and B > 1:
        # its cache is stored as [1, B] and concatenated with the chunk's [B, Tc] alphas
        pytest.skip("FunASR's forward_chunk streams one utterance at a time (B > 1 fails)")
    pred = _predictor(device)
    hidden, _ = _chunk(B, device)
    if impl == "cifops":
        with torch.no_grad():
            _, state = cifops.cif_stream_step(hidden, _alphas_of(pred, hidden), max_tokens=TC)

        def step():
            with torch.no_grad():
                out = cifops.cif_stream_step(hidden, _alphas_of(pred, hidden), None, state, max_tokens=TC)
            _sync(device)
            return out
    else:
        cache = {}
        with torch.no_grad():
            pred.forward_chunk(hidden, cache)  # mid-stream: its cache holds the residual

        def step():
            with torch.no_grad():
                out = pred.forward_chunk(hidden, dict(cache))
            _sync(device)
            return out

    step()
    benchmark.group = f"cif stream predictor chunk {device} B={B} Tc={TC} D={D}"
    benchmark.extra_info.update(impl=impl, device=device, threads=torch.get_num_threads())
    benchmark(step)

"""The peer CIF implementations the benchmarks compare against, each wrapped as
fn(hidden [B,T,D], alphas [B,T]) -> embeds, so forward+backward is timed alike.
A peer whose package is not installed is left out."""

import contextlib
import io
import warnings

import cifops


def _funasr():
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        from funasr.models.paraformer import cif_predictor  # prints noise about torch_complex
    return cif_predictor


def available_peers():
    peers = {"cifops": lambda h, a: cifops.cif(h, a).embeds}
    try:
        cp = _funasr()
        peers["funasr_cif"] = lambda h, a: cp.cif(h, a, 1.0)[0]
        peers["funasr_cif_v1"] = lambda h, a: cp.cif_v1(h, a, 1.0)[0]
    except ImportError:
        pass
    try:
        from torch_cif import cif_function

        peers["torch_cif"] = lambda h, a: cif_function(h, a, beta=1.0)["cif_out"][0]
    except ImportError:
        pass
    return peers

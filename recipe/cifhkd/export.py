"""Export a trained CIF-HKD checkpoint to ONNX, for transcription with ONNX Runtime
without torch (cifhkd.onnx_asr).

    python python/export_onnx.py --checkpoint exp/hkd/averaged.pt --out exp/hkd/onnx [--int8]
    python -m cifhkd.export ...                  # the same

OUT is a new folder, written whole or not at all (a temporary folder renamed at the
end; an existing OUT is never written into):

    encoder.onnx   fbank features to everything the search needs, one graph with dynamic
                   batch and length: the Conformer encoder, the CTC head, and CIF
                   (cifops.onnx_export: the fire decisions of cifops.cif). Inputs
                   feats [B, T, 80] float32 (utterance CMVN), feat_lens [B] int64,
                   count_offsets [C] int64 (the token counts tried around CIF's:
                   -R..R for decode.py's --count-search R). Outputs
                     enc_lens [B] int64, alphas [B, T'] (the CIF weights),
                     ctc_log_probs [B, T', V] float32,
                     counts [B] int64 (the tokens CIF fires with the tail threshold),
                     cif [C, B, N, D], cif_counts [C, B], fire_frames [C, B, N]: CIF with
                       the alphas scaled to sum to max(counts + offset_c, 1) (0 for an
                       utterance whose weights sum to zero), as decode.py's
                       token_count_candidates; N = max_tokens of config.json.
    decoder.onnx   one step of the autoregressive decoder with its key/value cache
                   (model.CifDecoder.step): prev_token [R] int64, cif_prev [R, D],
                   cif_cur [R, D], keys and values [layers, R, heads, i, D/heads] (the
                   cache of the i positions before; i = 0 at the first step) ->
                   log_probs [R, V] float32, new_keys and new_values (i + 1 positions).
                   The position is the cache's length.
    tokens.txt     the vocabulary (teacher.TokenVocab's file)
    config.json    format name and version, the files, the features, the model's sizes,
                   CIF's max_tokens, the default decoding options (decode.py's), the
                   source checkpoint's sha256
    encoder.int8.onnx, decoder.int8.onnx   with --int8: onnxruntime.quantization's
                   dynamic int8 quantization of the MatMul and Gemm weights

Nothing in OUT names the training folders. max_tokens (--max-tokens) is the width of
the CIF outputs, fixed in the graph (cifops exports CIF with a fixed width): the
runtime refuses an utterance whose CIF count + the count search exceeds it, naming it.
"""

import argparse
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

import cifops
from . import files
from . import decode as decode_lib
from . import features
from . import model as model_lib

FORMAT = "cifhkd-onnx"
FORMAT_VERSION = 1
MAX_TOKENS = 128
CONFIG_FILE = "config.json"
FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "tokens": "tokens.txt"}
INT8_FILES = {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}
ENCODER_INPUTS = ["feats", "feat_lens", "count_offsets"]
ENCODER_OUTPUTS = ["enc_lens", "alphas", "ctc_log_probs", "counts", "cif", "cif_counts", "fire_frames"]
DECODER_INPUTS = ["prev_token", "cif_prev", "cif_cur", "keys", "values"]
DECODER_OUTPUTS = ["log_probs", "new_keys", "new_values"]


class EncoderGraph(nn.Module):
    """What encoder.onnx computes (the module docstring), in eager PyTorch: the model's
    encode, its CTC head and decode.token_count_candidates' CIF for every offset, with
    max_tokens."""

    def __init__(self, model: model_lib.CifHkdModel, max_tokens: int):
        super().__init__()
        self.model = model
        self.max_tokens = int(max_tokens)

    def forward(self, feats: Tensor, feat_lens: Tensor, count_offsets: Tensor) -> Tuple[Tensor, ...]:
        c = self.model.config
        enc, enc_lens, alphas = self.model.encode(feats, feat_lens)
        ctc = self.model.ctc_log_probs(enc).transpose(0, 1)  # [B, T', V]
        # one more slot than the candidates' width: a count that does not fit shows as
        # max_tokens + 1, which the runtime refuses
        # the counts depend on the alphas only: CIF over a one-wide zero hidden gives them
        # without computing max_tokens + 1 embeddings of d_model each
        fired = cifops.cif(
            torch.zeros_like(alphas)[..., None],
            alphas,
            enc_lens,
            threshold=c.cif_threshold,
            tail_threshold=c.tail_threshold,
            max_tokens=self.max_tokens + 1,
        )
        counts = fired.token_lengths
        offsets = count_offsets[:, None]  # [C, 1]
        targets = torch.where(
            fired.alpha_sum[None] > 0, torch.clamp(counts[None] + offsets, min=1), torch.zeros_like(offsets)
        )  # [C, B]
        C, (B, T, D) = count_offsets.shape[0], enc.shape
        out = cifops.cif(
            enc[None].expand(C, B, T, D).reshape(C * B, T, D),
            alphas[None].expand(C, B, T).reshape(C * B, T),
            enc_lens[None].expand(C, B).reshape(C * B),
            threshold=c.cif_threshold,
            target_lengths=targets.reshape(C * B),
            max_tokens=self.max_tokens,
        )
        n = self.max_tokens
        return (
            enc_lens,
            alphas,
            ctc,
            counts,
            out.embeds.reshape(C, B, n, D),
            out.token_lengths.reshape(C, B),
            out.fire_frames.reshape(C, B, n),
        )


class DecoderStepGraph(nn.Module):
    """What decoder.onnx computes: model.CifDecoder.step with the cache as two stacked
    tensors [layers, R, heads, i, D/heads] (i = 0: the first step) and the position taken
    from the cache's length, and log-softmax of the logits (float32)."""

    def __init__(self, model: model_lib.CifHkdModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(
        self, prev_token: Tensor, cif_prev: Tensor, cif_cur: Tensor, keys: Tensor, values: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        cache = [(keys[i], values[i]) for i in range(keys.shape[0])]
        logits, cache = self.decoder.step(prev_token, cif_prev, cif_cur, keys.shape[3], cache)
        return (
            torch.log_softmax(logits.float(), dim=-1),
            torch.stack([k for k, _ in cache]),
            torch.stack([v for _, v in cache]),
        )


def _quiet_onnx_export(module: nn.Module, args: tuple, path: Path, dynamic_shapes, input_names, output_names):
    """cifops.onnx_export into path, without the exporter's progress chatter, then
    ONNX Runtime's basic graph optimisations (optimize_graph).

    torch.onnx.export's own optimiser (onnxscript's rewriter) is skipped: on the demo
    model it took about half of the export's time (pattern matching over the
    ~5000-node encoder graph) for a graph that ONNX Runtime runs no faster
    (benchmarks/RESULTS.md, "CIF-HKD transcription")."""
    import contextlib
    import io

    raw = path.with_name(path.stem + ".raw.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = cifops.onnx_export(
            module,
            args,
            None,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            optimize=False,
        )
        program.save(str(raw))
    optimize_graph(raw, path)
    raw.unlink()


def optimize_graph(source: Path, out: Path):
    """ONNX Runtime's basic graph optimisations of source (constant folding, redundant
    node elimination: standard ONNX operators only, nothing hardware-specific) saved as
    out. The weights' transposes are folded, so quantize_int8 finds them as constant
    MatMul inputs, and a session loads the result without folding again."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def example_inputs(model: model_lib.CifHkdModel, offsets: int = 5):
    """Inputs to trace the two graphs with: every dynamic dimension >= 2 (torch.export
    specialises sizes 0 and 1; the graphs then accept them)."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 83, c.num_mel_bins, generator=g)
    encoder = (feats, torch.tensor([83, 61]), torch.arange(offsets) - offsets // 2)
    rows, heads = 3, c.decoder_heads
    cache = torch.randn(c.decoder_layers, rows, heads, 2, c.d_model // heads, generator=g)
    decoder = (
        torch.tensor([model_lib.EOS_ID, 3, 4]),
        torch.randn(rows, c.d_model, generator=g),
        torch.randn(rows, c.d_model, generator=g),
        cache,
        cache.clone(),
    )
    return encoder, decoder


def min_export_frames(config: model_lib.ModelConfig) -> int:
    """The fewest fbank frames that torch.export is told the encoder gets: every layer
    then sees >= 2 frames, which its reshapes need to stay general (with 1 they would be
    specialised). The exported graph runs shorter inputs too (tested)."""
    frames = 2
    while model_lib.encoder_length(frames, config) < 2:
        frames += 1
    return frames


def export_graphs(model: model_lib.CifHkdModel, folder: Path, max_tokens: int):
    """Write encoder.onnx and decoder.onnx of the model into folder."""
    Dim = torch.export.Dim
    encoder_args, decoder_args = example_inputs(model)
    b, c = Dim("batch"), Dim("count_offsets")
    t = Dim.DYNAMIC
    with torch.no_grad():
        _quiet_onnx_export(
            EncoderGraph(model, max_tokens).eval(),
            encoder_args,
            folder / FILES["encoder"],
            ({0: b, 1: t}, {0: b}, {0: c}),
            ENCODER_INPUTS,
            ENCODER_OUTPUTS,
        )
        r, i = Dim("rows"), Dim("cached")
        _quiet_onnx_export(
            DecoderStepGraph(model).eval(),
            decoder_args,
            folder / FILES["decoder"],
            ({0: r}, {0: r}, {0: r}, {1: r, 3: i}, {1: r, 3: i}),
            DECODER_INPUTS,
            DECODER_OUTPUTS,
        )


def quantize_int8(folder: Path):
    """encoder.int8.onnx and decoder.int8.onnx: onnxruntime's dynamic quantization (int8
    weights, activations quantized per call) of the MatMul and Gemm nodes."""
    import logging
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its shape-inference warnings about the CIF's int tensors
    try:
        for name, out in INT8_FILES.items():
            quantize_dynamic(
                folder / FILES[name], folder / out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
            )
    finally:
        root.setLevel(level)


def export_config(model: model_lib.CifHkdModel, max_tokens: int, int8: bool, checkpoint_sha: str) -> dict:
    c = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "files": dict(FILES, **({"int8": INT8_FILES} if int8 else {})),
        "features": {
            "sample_rate": features.SAMPLE_RATE,
            "num_mel_bins": c.num_mel_bins,
            "frame_shift_s": decode_lib.FBANK_SHIFT_S,
            "fbank": "kaldi-native-fbank, no dither",
            "cmvn": "utterance",
        },
        "model": {
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "decoder_layers": c.decoder_layers,
            "decoder_heads": c.decoder_heads,
            "frame_period_s": decode_lib.frame_period_s(c),
            "max_tokens": max_tokens,
            "ctc_trained": c.ctc_weight > 0,
            "blank_id": model_lib.BLANK_ID,
            "eos_id": model_lib.EOS_ID,
            "config": dataclasses.asdict(c),
        },
        "decoding": {
            "beam": decode_lib.BEAM,
            "count_search": decode_lib.COUNT_SEARCH,
            "ctc_weight": decode_lib.resolve_ctc_weight(model, None),
            "max_batch_seconds": decode_lib.MAX_BATCH_SECONDS,
        },
        "source": {"checkpoint_sha256": checkpoint_sha, "cifops": cifops.__version__, "torch": torch.__version__},
    }


def export(
    checkpoint: Union[str, Path], out: Union[str, Path], *, int8: bool = False, max_tokens: int = MAX_TOKENS, log=print
) -> Path:
    """Export the checkpoint into the new folder out (the module docstring); returns it.
    Raises FileExistsError when out exists, FileNotFoundError for a missing checkpoint."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"export: --checkpoint {checkpoint} is not a file")
    if out.exists():
        raise FileExistsError(
            f"export: --out {out} exists; give a new folder (an export is never written over existing files)"
        )
    if max_tokens < 1:
        raise ValueError(f"export: --max-tokens must be >= 1, got {max_tokens}")
    start = time.perf_counter()
    trained = decode_lib.load_checkpoint(checkpoint)
    model, vocab = trained.model, trained.vocab
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        export_graphs(model, tmp, max_tokens)
        if int8:
            quantize_int8(tmp)
        vocab.save(tmp / FILES["tokens"])
        config = export_config(model, max_tokens, int8, files.sha256_file(checkpoint))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        os.rename(tmp, out)  # fails, rather than merging, should out have appeared since
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"export: {checkpoint} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))}; "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return out


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="train_hkd.py's averaged.pt or checkpoint-<step>.pt"
    )
    parser.add_argument("--out", type=Path, required=True, help="the export folder (must not exist)")
    parser.add_argument(
        "--int8", action="store_true", help="also write dynamically int8-quantized graphs (onnxruntime.quantization)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help="width of the exported CIF outputs: the most tokens an utterance can have, count search included",
    )
    return parser


def main(argv: Optional[List[str]] = None):
    args = get_parser().parse_args(argv)
    export(args.checkpoint, args.out, int8=args.int8, max_tokens=args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

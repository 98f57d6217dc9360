"""The demo corpus's held-out splits: test holds out speakers of the training population
(never heard in train or dev; each one's accent, engine and espeak variant heard in
training), test-accent holds out an accent training never hears, and make_corpus refuses a
test voice from outside the training population."""

import shutil
from pathlib import Path

import pytest

from cifhkd import corpus
from cifhkd import data


def accent_of(speaker_id: str) -> str:
    """The accent from a speaker id alone ("espeak-en-us-m3" -> "en-us", "flite-rms" ->
    "flite"): written here, apart from corpus.Voice, as the reference."""
    engine, _, rest = speaker_id.partition("-")
    return rest.rsplit("-", 1)[0] if engine == "espeak" else "flite"


def variant_of(speaker_id: str) -> str:
    return speaker_id.rsplit("-", 1)[1]


def test_default_test_voices_are_spread_over_the_training_population():
    seen, held_out, accent = corpus.split_voices(True, corpus.DEFAULT_TEST_VOICES, corpus.DEFAULT_ACCENT_TEST_VOICES)
    assert len(held_out) >= 12 and len(set(held_out)) == len(held_out)
    seen_ids = {v.speaker_id for v in seen}
    assert not seen_ids & {v.speaker_id for v in held_out + accent}
    trained_accents = {accent_of(s) for s in seen_ids}
    # every accent and engine training hears has held-out speakers, and nothing else does
    assert {accent_of(v.speaker_id) for v in held_out} == trained_accents
    assert "en-029" not in trained_accents and {accent_of(v.speaker_id) for v in accent} == {"en-029", "flite"}
    trained_variants = {variant_of(s) for s in seen_ids if s.startswith("espeak-")}
    assert all(variant_of(v.speaker_id) in trained_variants for v in held_out if v.engine == "espeak")
    assert corpus.unheard_population(seen, held_out) == []
    # the accent split's voices are not from the training population
    assert set(corpus.unheard_population(seen, accent)) == set(accent) - {corpus.Voice("flite", "awb")}


def test_make_corpus_refuses_test_voices_from_outside_the_training_population(tmp_path):
    if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir():
        pytest.skip("needs the Debian packages espeak-ng and fortunes")
    with pytest.raises(corpus.CorpusError, match="espeak-en-029-m1.*not from the training population"):
        corpus.make_corpus(
            tmp_path / "c",
            test_voices=["espeak:en-029+*"],
            accent_test_voices=[],
            num_train=2,
            num_dev=1,
            num_test=1,
            no_flite=True,
        )
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir(),
    reason="needs the Debian packages espeak-ng and fortunes",
)
def test_held_out_speakers_are_not_in_train_or_dev_and_their_accents_are(tmp_path):
    out = corpus.make_corpus(tmp_path / "c", num_train=150, num_dev=4, num_test=2, test_seen_voices=2, snr_range=(0, 0))
    splits = {s: data.read_kaldi_dir(out / s)[0] for s in ("train", "dev", "test", "test-accent", "test-seen")}
    speakers = {s: {u.speaker for u in utts} for s, utts in splits.items()}
    heard = speakers["train"] | speakers["dev"]
    assert not speakers["test"] & heard and not speakers["test-accent"] & heard
    assert not speakers["test"] & speakers["test-accent"]
    assert len(speakers["test"]) >= 12
    train_accents = {accent_of(s) for s in speakers["train"]}
    assert {accent_of(s) for s in speakers["test"]} <= train_accents
    assert not {accent_of(s) for s in speakers["test-accent"]} - {"flite"} & train_accents
    # clauses: the three test splits share theirs, none of them in train or dev
    texts = {s: {u.text for u in utts} for s, utts in splits.items()}
    assert texts["test"] == texts["test-accent"] == texts["test-seen"]
    assert not texts["test"] & (texts["train"] | texts["dev"])
    assert speakers["test-seen"] <= {
        v.speaker_id
        for v in corpus.split_voices(
            shutil.which("flite") is not None, corpus.DEFAULT_TEST_VOICES, corpus.DEFAULT_ACCENT_TEST_VOICES
        )[0]
    }

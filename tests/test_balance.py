"""Class imbalance: warning, class-weighted loss, balanced sampler, selection metric; rejection."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

import visiontune
from visiontune.training.config import TrainConfig
from visiontune.training.setup import setup_run


@pytest.fixture()
def imbalanced(image_folder):
    for extra in sorted((image_folder / "blue").iterdir())[2:]:
        extra.unlink()  # 12 red, 12 green, 2 blue: 6:1
    return image_folder


@pytest.mark.parametrize("balance,strategy", [("weights", "finetune"), ("sampler", "finetune"),
                                              ("sampler", "linear-probe")])
def test_balance_modes_train(imbalanced, tmp_path, capsys, balance, strategy):
    run = visiontune.train(imbalanced, balance=balance, strategy=strategy, select_metric="macro_f1", epochs=2,
                           val_fraction=0.5, run_dir=str(tmp_path / "run"), **FAST)
    out = capsys.readouterr().out
    assert "class imbalance" in out and "--balance" in out
    meta = json.loads((run.model_dir / "model.json").read_text())
    assert "val_macro_f1" in meta["metrics"]


def test_context_weights_and_sampler(imbalanced, tmp_path):
    ctx = setup_run(TrainConfig.from_dict({"data": str(imbalanced), "balance": "weights",
                                           "run_dir": str(tmp_path / "r"), **FAST}))
    counts = ctx.class_counts()
    weights = ctx.class_weights()
    assert ctx.sample_weights() is None
    assert pytest.approx(float((weights * counts).std()), abs=1e-5) == 0.0  # each class weighs the same in total
    ctx.cfg = ctx.cfg.replace(balance="sampler")
    draw = ctx.sample_weights()
    per_class = {label: float(draw[i]) * float(counts[label]) for i, (_, label) in enumerate(ctx.splits.train)}
    assert all(abs(v - 1.0) < 1e-6 for v in per_class.values())

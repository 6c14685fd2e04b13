"""Progressive resizing (``--early-size``/``--early-steps``): the first optimizer steps on images
train at the smaller side, the rest and every validation at the run's own, the step counter
deciding; sizes a network does not take are refused before the run dir exists. The planner's
rule is in tests/test_budget.py."""

from __future__ import annotations

import pytest
from conftest import FAST

from visiontune.core.errors import ConfigError
from visiontune.training.module import ClassifierModule


def test_the_first_steps_train_at_the_early_size(shared_folder, tmp_path, monkeypatch):
    import visiontune

    seen: list[tuple[bool, int]] = []  # (training, side) of every batch the network sees
    forward = ClassifierModule.forward

    def recording(self, x):
        if x.dim() == 4:  # images (the head's warm-up trains on cached feature vectors)
            seen.append((self.training, x.shape[-1]))
        return forward(self, x)

    monkeypatch.setattr(ClassifierModule, "forward", recording)
    run = visiontune.train(shared_folder, run_dir=tmp_path / "run", epochs=3, early_size=16, early_steps=4,
                           **FAST)
    trained = [side for training, side in seen if training]
    assert trained[:4] == [16] * 4 and set(trained[4:]) == {32} and len(trained) > 4
    assert {side for training, side in seen if not training} == {32}  # validation at the run's own size
    assert run.load().card.preprocessing.height == 32  # the model is the run's own size
    text = (run.run_dir / "config.yaml").read_text()
    assert "early_size: 16" in text and "early_steps: 4" in text


def test_an_early_size_the_network_cannot_take_is_refused_by_name(shared_folder, tmp_path):
    import visiontune

    fast = {k: v for k, v in FAST.items() if k != "img_size"}  # the network's own 224 px
    with pytest.raises(ConfigError, match="--early-size 256 is not smaller than the input size 224 px"):
        visiontune.train(shared_folder, run_dir=tmp_path / "run", epochs=2, early_size=256, early_steps=2, **fast)
    with pytest.raises(ConfigError, match="go together"):
        visiontune.train(shared_folder, run_dir=tmp_path / "run", epochs=2, early_steps=2, **FAST)
    assert not (tmp_path / "run").exists()

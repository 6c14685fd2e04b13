"""``--weights RUN|MODEL``: a trained visiontune model starts a new run on the same classes, its
network and its classifier included; other classes, another ``--model`` or a pruned model are
refused before a run dir exists."""

from __future__ import annotations

import torch
from conftest import FAST, FAST_FLAGS, make_folder, vt_main
from safetensors.torch import load_file

from visiontune.models.artifact import WEIGHTS_FILE, read_card, write_card
from visiontune.models.weights import read_state_dict
from visiontune.training.config import TrainConfig
from visiontune.training.setup import setup_run


def test_a_run_folder_reads_as_its_model_weights(trained_run):
    run, _ = trained_run
    saved = load_file(str(run.model_dir / WEIGHTS_FILE))
    for folder in (run.run_dir, run.model_dir):
        state = read_state_dict(folder)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_a_trained_model_starts_the_run_with_its_classifier(trained_run, tmp_path):
    """Every tensor of the new run's network, the classifier too, is the trained model's at the start;
    the network is the model's own and a plan may not swap it."""
    run, data = trained_run
    cfg = TrainConfig.from_dict({"data": str(data), "weights": str(run.run_dir), "epochs": 1,
                                 "run_dir": str(tmp_path / "next run"), **FAST})
    ctx = setup_run(cfg)
    saved = load_file(str(run.model_dir / WEIGHTS_FILE))
    state = ctx.model.state_dict()
    assert ctx.arch.classifier + ".weight" in saved
    assert all(torch.equal(state[k].float(), saved[k]) for k in saved)
    assert ctx.cfg.model.name == read_card(run.model_dir).architecture.requested
    assert {"model", "weights"} <= ctx.cfg.given


def test_pretrained_backbone_start_is_unchanged_for_a_weights_file(trained_run, tmp_path):
    """A plain state-dict file (even a model's own weights file) keeps the earlier meaning: the body
    is loaded, the classifier starts anew."""
    run, data = trained_run
    cfg = TrainConfig.from_dict({"data": str(data), "weights": str(run.model_dir / WEIGHTS_FILE), "epochs": 1,
                                 "run_dir": str(tmp_path / "file run"), **FAST})
    ctx = setup_run(cfg)
    saved = load_file(str(run.model_dir / WEIGHTS_FILE))
    state = ctx.model.state_dict()
    head = ctx.arch.classifier + ".weight"
    assert not torch.equal(state[head], saved[head])
    assert all(torch.equal(state[k].float(), saved[k]) for k in saved if not k.startswith(ctx.arch.classifier))


def test_other_classes_another_model_or_a_pruned_model_are_refused(trained_run, tmp_path, capsys):
    run, data = trained_run
    other = make_folder(tmp_path / "other classes", per_class=3, classes={"cat": (200, 0, 0), "dog": (0, 0, 200)})
    pruned = tmp_path / "pruned model"
    pruned.mkdir()
    (pruned / WEIGHTS_FILE).write_bytes((run.model_dir / WEIGHTS_FILE).read_bytes())
    card = read_card(run.model_dir)
    write_card(pruned, card.replace(pruned={"ratio": 0.2, "shapes": {}}))
    cases = ((other, (), "same classes"), (data, ("--model", "resnet18"), "drop --model"),
             (data, (), "pruned model cannot start a run"))
    for i, (folder, extra, message) in enumerate(cases):
        weights = pruned if i == 2 else run.run_dir
        run_dir = tmp_path / f"refused {i}"
        code, _, err = vt_main(capsys, "train", folder, "--weights", weights, *extra, "--epochs", "1",
                               "--run-dir", run_dir, *FAST_FLAGS)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not run_dir.exists()


def test_a_probe_on_a_trained_model_keeps_its_fine_tuned_body(trained_run, tmp_path):
    """A linear probe started from a trained model fits a head on that model's body (fine-tuned),
    which it leaves as it was."""
    import visiontune

    run, data = trained_run
    out = visiontune.train(data, weights=str(run.run_dir), strategy="linear-probe", epochs=1,
                           run_dir=str(tmp_path / "probe run"), **FAST)
    before, after = load_file(str(run.model_dir / WEIGHTS_FILE)), load_file(str(out.model_dir / WEIGHTS_FILE))
    head = read_card(out.model_dir).architecture.classifier + "."
    body = [k for k in before if not k.startswith(head) and k.endswith("weight")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)

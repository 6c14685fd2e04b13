"""The README.md model card: generated from model.json, rewritten with it, in the Hub's format."""

from __future__ import annotations

import yaml
from conftest import CLASS_NAMES

from visiontune.models.artifact import read_card
from visiontune.models.readme import model_readme


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_every_trained_model_folder_has_its_model_card(trained_run):
    run, _ = trained_run
    text = (run.model_dir / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    results = meta["model-index"][0]["results"][0]["metrics"]
    card = read_card(run.model_dir)
    assert {"type": "accuracy", "value": round(card.metrics["val"]["accuracy"], 4), "name": "val accuracy"} in results
    for section in ("## Intended use", "## Training data", "## Preprocessing", "## Evaluation results",
                    "## Calibration", "## Limitations", "## How to load"):
        assert section in text, section
    counts = card.training["class_counts"]
    for name in CLASS_NAMES:  # class counts and the per-class table, from the run itself
        assert f"| {name} | {counts[name]} |" in text
        assert text.count(f"| {name} |") == 2
    assert f"T = {card.temperature:.3f}" in text
    assert text == model_readme(card)  # nothing hand-written: the card alone gives it


def test_hf_export_carries_the_card_with_the_timm_snippet(trained_run, tmp_path):
    from visiontune.export.exporter import export_model

    export_model(trained_run[0].run_dir, "hf", out=tmp_path / "hf")
    text = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(text)["library_name"] == "timm"
    assert 'timm.create_model("local-dir:' in text


def test_class_names_cannot_break_the_tables():
    from visiontune.data.preprocess import Preprocessing
    from visiontune.models.card import ModelCard

    card = ModelCard(["a|b", "c`d"], Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3),
                     training={"class_counts": {"a|b": 3, "c`d": 4}})
    text = model_readme(card)
    assert "| a\\|b | 3 |" in text and "| c'd | 4 |" in text

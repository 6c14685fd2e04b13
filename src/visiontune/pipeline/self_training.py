"""``visiontune train DATA --unlabeled DIR``: self-training within the run's time budget.

1. **Teacher**: the run the same command would train on the labelled data alone, in
   ``RUN/teacher``, within a third of the budget (on a small set of photos the plan is the
   cross-validated probe, which ends in a minute or two; on small images or more data, a fine-tune).
2. **Pseudo-labels**: the teacher labels the unlabelled images. An image is kept when its
   calibrated top probability reaches the threshold at which the teacher's own validation answers
   are :data:`MIN_PRECISION` right, its unknown-score accepts it, and its class is not over-
   represented: each class keeps at most the median class's count of confident images, its most
   confident first (a class the teacher favours would otherwise crowd out the rest). When scoring
   every unlabelled image would not leave the student its share of the time, a random sample that
   fits is scored, and the plan says so.
3. **Student**: a run on the labelled training images plus the pseudo-labelled ones, in
   ``RUN/student``, with the time left, starting from the teacher's network where the teacher
   fine-tuned one (:func:`student_start`: a continued fine-tune at the input size where 1.5 passes over
   its images fit; else from the pretrained backbone), measuring its test-time augmentation where the
   teacher did; it is validated on the teacher's validation split (labelled images only).
4. **The better of the two on that split is the run's model**: its files are copied into ``RUN``
   (so ``evaluate RUN``, ``report RUN`` and ``predict RUN`` work as for any run). A student that ties
   the teacher is kept; one below it falls back to the teacher, saying so (with the val images only one of the
   two answers right, each side's count, and where the student stays). ``RUN/self_training.json`` and the
   model card's ``training.self_training`` record the counts, the threshold, both scores and the choice.

A ``--time`` under :data:`MIN_BUDGET_S` is too short for both: the run trains on the labelled images
alone, in the whole budget, and says so (and records it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.layout import RunLayout
from ..core.safe_io import atomic_write_text
from ..data.scan import Splits, discover, read_split_csv, write_split_csv
from ..inference.classifier import Classifier, expand_inputs
from ..models.artifact import read_card, write_card
from ..training.budget import format_duration, run_budget
from ..training.config import TrainConfig
from ..training.registry import RANDOM_INIT
from ..training.setup import make_run_dir

MIN_PRECISION = 0.9       # pseudo-labels kept above the probability where the teacher's val answers are this right
TEACHER_SHARE = 1 / 3     # of a budget, for the teacher (a small-data probe ends early by itself)
LABELLING_SHARE = 1 / 3   # of the time left after the teacher, at most, for scoring the unlabelled images
MIN_STUDENT_S = 120.0     # a student with less time than this is not trained: the teacher is the model
# a shorter --time trains on the labelled images alone: its third is a teacher of under 2 minutes, most of
# them the plan's measuring and the run's start and finish, and what is left after labelling barely pays a
# student (at --time 3m: a 56 s teacher, no image scored, the teacher kept: 0.574 against the labelled-only
# run's 0.6885 on CIFAR-10 with 200 labels; bench/RESULTS.md "Unlabelled images")
MIN_BUDGET_S = 3 * MIN_STUDENT_S
NOT_COPIED = ("teacher", "student", "checkpoints", "logs", "self_training.json")


def check_unlabeled(cfg: TrainConfig) -> tuple[list[str], Splits]:
    """The unlabelled images of ``cfg.data.unlabeled`` and the labelled data's splits (paths only),
    refused (before anything trains) when there
    are none, when some are labelled images of ``DATA``, or when the data is multi-label."""
    folder = cfg.data.unlabeled
    files = expand_inputs([str(folder)])
    if not files:
        raise ConfigError(f"--unlabeled {folder}: no images found; give a folder of unlabelled images")
    if cfg.runtime.resume or cfg.runtime.devices * cfg.runtime.num_nodes > 1:
        raise ConfigError("--unlabeled trains a teacher and a student, one process each, from the start: drop "
                          "--resume, --devices and --num-nodes (resume the teacher or the student run itself)")
    splits = _labelled(cfg)
    if not splits.task.pseudo_labels:
        raise ConfigError(f"--unlabeled works with single-label data, not {splits.task.title} data: train without it")
    labelled = {os.path.realpath(p) for split in (splits.train, splits.val, splits.test) for p, _ in split}
    overlap = [f for f in files if os.path.realpath(f) in labelled]
    if overlap:
        raise ConfigError(f"--unlabeled {folder}: {len(overlap)} of its images are labelled images of {cfg.data.path} "
                          f"(e.g. {overlap[0]}); remove them from the unlabelled folder, so that no image is "
                          "both a labelled and a pseudo-labelled example")
    return files, splits


def confident_threshold(val_probs: torch.Tensor, val_target: torch.Tensor, precision: float | None = None) -> float:
    """The lowest top probability at which the teacher's val answers with at least that probability
    are ``precision`` (default :data:`MIN_PRECISION`) right (1.0 when none are).

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
        >>> round(confident_threshold(probs, torch.tensor([0, 0, 1, 0]), precision=0.9), 4)
        0.8
    """
    precision = MIN_PRECISION if precision is None else precision
    top, pred = val_probs.max(dim=1)
    order = top.argsort(descending=True)
    right = (pred[order] == val_target[order]).double().cumsum(0)
    share = right / torch.arange(1, len(order) + 1, dtype=torch.float64)
    ok = (share >= precision).nonzero()
    return float(top[order][int(ok.max())]) if len(ok) else 1.0


def select(probs: torch.Tensor, accepted: torch.Tensor, threshold: float) -> list[int]:
    """Indices of the pseudo-labels kept: accepted by the unknown-score, top probability at least
    ``threshold``, at most the median class's count per class (most confident first).

    Example:
        >>> probs = torch.tensor([[0.99, 0.01], [0.98, 0.02], [0.97, 0.03], [0.1, 0.9], [0.6, 0.4]])
        >>> select(probs, torch.ones(5, dtype=torch.bool), 0.85)  # class 0 has 3, class 1 has 1: median 2
        [0, 1, 3]
    """
    top, pred = probs.max(dim=1)
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(top)), key=lambda i: -float(top[i])):
        if accepted[i] and float(top[i]) >= threshold:
            by_class.setdefault(int(pred[i]), []).append(i)
    if not by_class:
        return []
    cap = max(1, int(statistics.median(len(v) for v in by_class.values())))
    return sorted(i for kept in by_class.values() for i in kept[:cap])


def self_train(cfg: TrainConfig, started: float, train_run) -> Any:
    """Teacher, pseudo-labels, student, and the better of the two as the run (see the module).

    ``train_run(cfg, started)`` trains one run (:func:`~visiontune.pipeline.train.run_training`).
    """
    files, labelled = check_unlabeled(cfg)
    budget = run_budget(cfg)
    deadline = None if budget is None else started + budget
    plain = cfg.replace(unlabeled=None)
    if budget is not None and budget < MIN_BUDGET_S:  # a teacher in a third of it would be the model, and worse
        reason = (f"--time {format_duration(budget)} is too short for self-training (a teacher in a third of it, "
                  "then labelling and a student in the rest; give it at least "
                  f"{format_duration(MIN_BUDGET_S)})")
        print(f"self-training: {reason}; the run trains on the labelled images alone, in the whole budget", flush=True)
        alone = train_run(plain, started)
        facts = {"unlabeled": len(files), "scored": 0, "pseudo_labels": 0, "kept": "labelled-only",
                 "fallback": reason}
        _record(alone.run_dir, facts)
        return replace(alone, metrics={**alone.metrics, "self_training": facts})
    root = make_run_dir(cfg.runtime.run_dir)

    def time_left() -> float:
        return (deadline - time.time()) if deadline is not None else float("inf")

    # 1. the teacher, in its share of the budget (a probe ends sooner by itself and is not stopped by it)
    teacher_cfg = plain.replace(run_dir=str(root / "teacher"))
    if budget is not None:
        teacher_cfg = teacher_cfg.replace(time=f"{int(max(30.0, min(budget * TEACHER_SHARE, time_left())))}s")
    print(f"self-training: {len(files)} unlabelled images; first the teacher, on the labelled images alone "
          f"({root / 'teacher'})", flush=True)
    teacher = train_run(teacher_cfg, started if deadline is None else time.time())
    clf = Classifier.load(teacher.model_dir)  # the precision predict would use: it scores every unlabelled image

    # 2. pseudo-labels, on a sample that leaves the student its time
    began = time.time()
    speed = _inference_speed(clf, files)
    scored = files
    if deadline is not None:
        affordable = int(max(0.0, time_left() - MIN_STUDENT_S) * LABELLING_SHARE * speed)
        if affordable < len(files):
            scored = random.Random(cfg.runtime.seed).sample(files, affordable)
    print(f"self-training plan: the teacher labels {len(scored)} of {len(files)} unlabelled images at about "
          f"{speed:.0f} img/s (projected {format_duration(len(scored) / speed)})"
          + ("" if deadline is None else f"; the student gets the {format_duration(time_left() - len(scored) / speed)}"
                                         " left"), flush=True)
    names = list(clf.class_names)
    val_rows = read_split_csv(RunLayout(teacher.run_dir).split_csv("val"), names)
    val_logits, val_ok, _ = clf.logits_of([p for p, _ in val_rows])
    val_target = torch.tensor([y for _, y in val_rows])
    probs_val = clf.task.probabilities(val_logits[val_ok], clf.temperature)
    threshold = confident_threshold(probs_val, val_target[val_ok])
    outputs, ok, _ = clf.outputs_of(scored) if scored else (torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool), {})
    kept: list[int] = []
    if len(scored):
        logits, unknown = clf.split(outputs)
        probs = clf.task.probabilities(logits, clf.temperature)
        accepted = ok & (unknown >= clf.unknown_threshold if unknown is not None else torch.ones_like(ok))
        kept = select(probs, accepted, threshold)
    labelling_s = time.time() - began
    counts: dict[str, int] = {}
    pseudo_rows = []
    for i in kept:
        name = names[int(probs[i].argmax())]
        counts[name] = counts.get(name, 0) + 1
        pseudo_rows.append((scored[i], names.index(name)))
    print(f"self-training: {len(kept)} pseudo-labels kept (calibrated probability >= {threshold:.3f}, where the "
          f"teacher's val answers are at least {MIN_PRECISION:.0%} right; at most "
          f"{max(counts.values(), default=0)} per class)", flush=True)
    facts: dict[str, Any] = {"unlabeled": len(files), "scored": len(scored), "pseudo_labels": len(kept),
                             "per_class": counts, "threshold": round(threshold, 4), "min_precision": MIN_PRECISION,
                             "labelling_seconds": round(labelling_s, 1)}
    metric = cfg.optim.select_metric
    teacher_score = _val_score(teacher.model_dir, metric)

    # 3. the student, on the labelled and the pseudo-labelled images, validated on the teacher's val split
    winner, reason = teacher, ""
    if not kept:
        reason = "no unlabelled image was labelled confidently enough"
    elif time_left() < MIN_STUDENT_S:
        reason = f"{format_duration(max(0.0, time_left()))} left, under the student's minimum"
    else:
        data = root / "student-data.csv"
        train_rows = read_split_csv(RunLayout(teacher.run_dir).split_csv("train"), names)
        write_split_csv(train_rows + pseudo_rows, names, data, clf.task)
        student_cfg = plain.replace(data=str(data), val=str(RunLayout(teacher.run_dir).split_csv("val")),
                                    run_dir=str(root / "student"))
        start = student_start(teacher.model_dir, cfg.given)
        if start:
            student_cfg = student_cfg.replace(**start)
            student_cfg.given = cfg.given | set(start)
        facts["student_start"] = "teacher" if "weights" in start else "pretrained"
        if deadline is not None:
            student_cfg = student_cfg.replace(time=f"{int(time_left())}s")
        print(f"self-training: the student, on {len(train_rows)} labelled and {len(kept)} pseudo-labelled images, "
              + ("from the teacher's weights" if start else "from the pretrained backbone")
              + f" ({root / 'student'})", flush=True)
        student = train_run(student_cfg, time.time())
        student_score = _val_score(student.model_dir, metric)
        facts["student_val"] = student_score
        teacher_right = (val_logits.argmax(1) == val_target) & val_ok
        facts["val_disagreements"] = disagreements(teacher_right, student.model_dir, val_rows)
        # a tie keeps the student: the run is not below the teacher on the val split either way, and where the
        # split could not tell them apart held-out images did: each of the six fine-tuned students measured
        # scored 0.30-3.00 points over its teacher (CIFAR-10, 1,000 labels, 39,000 unlabelled, --time 30m,
        # 2,000 held-out images; bench/RESULTS.md "Unlabelled images")
        if student_score >= teacher_score:
            winner = student
        else:
            reason = (f"the student's val {metric} {student_score:.4f} is below the teacher's "
                      f"{teacher_score:.4f}; the student's model stays in {RunLayout(student.run_dir).model_dir}")
    facts.update(teacher_val=teacher_score, kept="student" if winner is not teacher else "teacher",
                 metric=metric)
    if reason:
        facts["fallback"] = reason
    _promote(winner.run_dir, root, facts)
    split = facts.get("val_disagreements")
    close = ("" if not split else f" (of the {len(val_rows)} val images, the student alone answers {split['student']} "
             f"right, the teacher alone {split['teacher']}: a split this size measures an accuracy to about "
             f"+-{100 * (0.25 / max(len(val_rows), 1)) ** 0.5:.1f} points)")
    print("self-training: " + (f"kept the student (val {metric} {facts['student_val']:.4f} vs the teacher's "
                               f"{teacher_score:.4f})" if winner is not teacher
                               else f"kept the teacher: {reason}") + close + f"; the model is in {root / 'model'}",
          flush=True)
    return replace(winner, run_dir=root, model_dir=RunLayout(root).model_dir,
                   metrics={**winner.metrics, "self_training": facts})


def student_start(teacher_dir: Path, given: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The student's options that come from its teacher. ``{"tta": "auto"}`` where the teacher measured
    its test-time augmentation (``training.tta_choice``) and ``--tta`` is not in ``given`` (the user's
    options, which both runs share): the two are compared on the val split, so the student measures its
    second view too, in time its plan sets aside, rather than one view against the teacher's two.

    ``{"weights": teacher_dir}`` when the teacher trained its network on images (a fine-tune; not
    a probe on frozen features, nor a network from random init): the student starts
    from the teacher's model, classifier included, with no head-only epochs
    (``--weights RUN``, :func:`~visiontune.training.setup.trained_start`); its plan continues the
    fine-tune at the largest size up to the teacher's where 1.5 passes over the data fit
    (:data:`~visiontune.training.budget.MIN_CONTINUED_PASSES`), else refits the classifier on the
    teacher's features.

    Measured on CIFAR-10 with 1,000 labels, 39,000 unlabelled and ``--time 30m`` (an AVX2 CPU, 2,000
    held-out images; bench/RESULTS.md "Unlabelled images"), against the labelled-only run's 0.8195:
    the classifier refitted on the teacher's features 0.8260; a fine-tune at the teacher's 128 px,
    1.3 passes, 0.8300; at 96 px, 1.6 passes, 0.8375, and 2.1 passes (the plan's), 0.8425 and 0.8300
    in two runs, 3 epochs (with the second view measured) 0.7975. Each of the six fine-tuned students
    scored 0.30-3.00 points over its own teacher (0.7945-0.8225: the teacher moves from run to run), and
    the 200-image val split kept two of them.
    """
    card = read_card(teacher_dir)
    start: dict[str, Any] = {"tta": "auto"} if "tta_choice" in card.training and "tta" not in given else {}
    if card.training.get("strategy") in ("linear-probe", *RANDOM_INIT) or card.architecture is None:
        return start
    return {**start, "weights": str(teacher_dir)}


def disagreements(teacher_right: torch.Tensor, student_dir: Path, val_rows: list[tuple[str, int]]) -> dict[str, int]:
    """On the val images where exactly one of the two models answers right, how many are the
    student's and how many the teacher's (``teacher_right``: the teacher's answer to each row is
    right): the evidence behind the choice, which a 200-image split gives little of."""
    logits, ok, _ = Classifier.load(student_dir).logits_of([p for p, _ in val_rows])
    student_right = (logits.argmax(1) == torch.tensor([y for _, y in val_rows])) & ok
    return {"student": int((student_right & ~teacher_right).sum()),
            "teacher": int((teacher_right & ~student_right).sum())}


def _labelled(cfg: TrainConfig) -> Splits:
    """The labelled data's splits as the run will find them (paths only: nothing is decoded)."""
    return discover(cfg.data.path, cfg.data.val, cfg.data.val_fraction, cfg.runtime.seed, scan=False,
                    task=cfg.data.task, label_delim=cfg.data.label_delim, cap_val="val_fraction" not in cfg.given)


def _inference_speed(clf: Classifier, files: list[str], sample: int = 64) -> float:
    """Images per second the teacher scores (read, decode, forward), timed on a few of ``files``."""
    probe = files[:sample]
    clf.outputs_of(probe[:8])  # warm-up: kernels and the loader
    start = time.perf_counter()
    clf.outputs_of(probe)
    return len(probe) / max(time.perf_counter() - start, 1e-6)


def _val_score(model_dir: Path, metric: str) -> float:
    return float(read_card(model_dir).metrics.get("val", {}).get(metric, 0.0))


def _promote(run_dir: Path, root: Path, facts: dict[str, Any]) -> None:
    """Copy the chosen run's files into ``root`` and record the self-training in its model card."""
    for item in run_dir.iterdir():
        if item.name in NOT_COPIED or item.is_symlink():
            continue
        target = root / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True, symlinks=False)
        else:
            shutil.copy2(item, target)
    _record(root, facts)


def _record(root: Path, facts: dict[str, Any]) -> None:
    """The self-training's facts in the run's model card and ``self_training.json``."""
    card = read_card(root / "model")
    write_card(root / "model", card.replace(training={**card.training, "self_training": facts}))
    atomic_write_text(root / "self_training.json", json.dumps(facts, indent=2) + "\n")

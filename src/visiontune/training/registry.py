"""The training layer's named choices, each the single source of its names.

Implementations are named as ``"module:attr"`` and imported on first use, so the CLI parser and
config validation never import Lightning or scikit-learn.
"""

from __future__ import annotations

from ..core.registry import Registry
from ..models.tta import TTA_MODES

_TRAINING = "visiontune.training."
STRATEGIES = Registry("strategy", {
    "finetune": (_TRAINING + "strategies:finetune",
                 "head warm-up on the frozen body for --freeze-epochs, then all layers (body LR = LR / --lr-mult)"),
    "linear-probe": (_TRAINING + "probe:linear_probe", "frozen backbone, features computed once, a new head (--head)"),
    "progressive": (_TRAINING + "strategies:progressive", "layer groups unfrozen from the top down, layer-wise LRs"),
    "scratch": (_TRAINING + "strategies:scratch", "random init, every layer at --lr"),
})
RANDOM_INIT = {"scratch"}  # strategies that start from random weights whatever --weights says

# --tta: a mode of visiontune.models.tta, or "auto": validate with one view, then keep AUTO_TTA where the
# val split measures it ahead by at least TTA_MIN_GAIN (visiontune.training.tta_choice)
AUTO_TTA = "flip-zoom"
TRAIN_TTA = Registry.choices("tta", {name: TTA_MODES.help(name) for name in TTA_MODES},
                             auto=f"measured on the val split at the end: {AUTO_TTA} where it gains, else none")

PROBE_HEADS = Registry("head", {
    "linear": (_TRAINING + "probe:fit_gradient_head", "gradient descent on cached features"),
    "logistic": (_TRAINING + "probe:fit_logistic_head", "scikit-learn logistic regression"),
    "svm": (_TRAINING + "probe:fit_svm_head", "scikit-learn linear SVM"),
    "auto": (_TRAINING + "probe:fit_auto_head", "the probe repeated k-fold cross-validation prefers (small data)")})

OPTIMIZERS = Registry("optimizer", {"adamw": ("torch.optim:AdamW", "AdamW (default LR 1e-3)"),
                                    "adam": ("torch.optim:Adam", "Adam (default LR 1e-3)"),
                                    "sgd": ("torch.optim:SGD", "SGD with Nesterov momentum (default LR 1e-2)")})
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2}

LOGGERS = Registry("logger", {
    "csv": (_TRAINING + "loggers:csv_logger", "RUN/logs/metrics.csv"),
    "tensorboard": (_TRAINING + "loggers:tensorboard_logger", "RUN/logs/ event files"),
    "mlflow": (_TRAINING + "loggers:mlflow_logger", "an MLflow run at $MLFLOW_TRACKING_URI (default "
               "sqlite:///mlflow.db): params, metrics, artifacts and the model as an MLflow pyfunc")})

# choices whose implementation is a branch in the code that reads them
SCHEDULES = Registry.choices("schedule", cosine="cosine decay to 1% of the peak", step="x0.1 every --step-size epochs",
                             none="constant")
DISTRIBUTED = Registry.choices("distributed", auto="Lightning's choice",
                               ddp="one process per device (gloo on CPU, nccl on GPU)",
                               ddp_spawn="like ddp, processes spawned")
BN_STATS = Registry.choices("bn_stats", train="update the running statistics of trainable layers",
                            frozen="keep the pretrained statistics")
BALANCE = Registry.choices("balance", none="no re-weighting", weights="class-weighted loss",
                           sampler="class-balanced sampling")
SELECT_METRICS = Registry.choices("select_metric", accuracy="top-1 accuracy", macro_f1="macro-averaged F1",
                                  balanced_accuracy="macro-averaged recall",
                                  map="macro mean average precision (multi-label, and its default)")
# --task: auto, or the name of a task of visiontune.task.TASKS with its description. A copy: the CLI
# parser builds without torch, which visiontune.task imports; tests/test_config.py keeps it in step.
TASKS = Registry.choices("task", auto="multi-label for a one-hot CSV or rows with 0 or 2+ labels, else single",
                         single="one class per image", multi="any number of classes per image (sigmoid outputs)")

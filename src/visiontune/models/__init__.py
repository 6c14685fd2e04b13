"""Models: build by name, layer groups, safe weight files, self-describing artifacts."""

from .artifact import ArtifactError, load_model, save_model
from .factory import Architecture, ModelError, build_model, rebuild
from .weights import WeightsError, read_state_dict

__all__ = [
    "Architecture",
    "ArtifactError",
    "ModelError",
    "WeightsError",
    "build_model",
    "load_model",
    "read_state_dict",
    "rebuild",
    "save_model",
]

"""Split a backbone into layer groups (bottom to top) for progressive unfreezing and layer-wise LRs.

timm models describe their own groups (``group_matcher``); torchvision models are grouped by
their top-level stages.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError


def head_parameter_names(model: nn.Module, head: str) -> list[str]:
    return [f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()]


def body_groups(model: nn.Module, head: str) -> list[list[str]]:
    """Parameter names of the body, in groups ordered from input (stem) to output."""
    head_names = set(head_parameter_names(model, head))
    groups = _timm_groups(model) if hasattr(model, "group_matcher") else _stage_groups(model)
    cleaned = [[n for n in g if n not in head_names] for g in groups]
    cleaned = [g for g in cleaned if g]
    seen = {n for g in cleaned for n in g}
    rest = [n for n, _ in model.named_parameters() if n not in seen and n not in head_names]
    if rest:  # anything the matcher missed (e.g. a final norm) joins the top group
        if cleaned:
            cleaned[-1].extend(rest)
        else:
            cleaned.append(rest)
    return cleaned


def bottom_parameter_names(model: nn.Module, head: str, count: int) -> list[str]:
    """Parameter names of the body's ``count`` bottom groups (stem first), which ``--freeze-bottom``
    keeps frozen; ``count`` must leave at least one group of the body to train."""
    if count <= 0:
        return []
    groups = body_groups(model, head)
    if count >= len(groups):
        raise ConfigError(f"--freeze-bottom {count} leaves nothing of the body to train: this network has "
                          f"{len(groups)} layer groups; give at most {len(groups) - 1}, or --strategy linear-probe "
                          "to train the head alone")
    return [n for g in groups[:count] for n in g]


def _timm_groups(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters  # lazy: only training needs layer groups

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(grouped.items(), key=lambda kv: kv[0])]


def _stage_groups(model: nn.Module) -> list[list[str]]:
    children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    if len(children) < 3:  # e.g. torchvision efficientnet: features(Sequential of stages) + classifier
        expanded = []
        for name, module in children:
            subs = [(f"{name}.{n}", m) for n, m in module.named_children() if any(True for _ in m.parameters())]
            expanded.extend(subs if len(subs) > 1 else [(name, module)])
        children = expanded
    return [[f"{name}.{n}" for n, _ in module.named_parameters()] for name, module in children]

"""`mythos experiment NAME`: reproducible experiments behind the OpenMythos hypothesis. Each one
is a typed `run(cfg) -> dict` that writes report.md, results.json and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openmythos.experiments import act_pareto, depth_extrapolation, param_efficiency, stability
from openmythos.experiments.common import ExperimentConfig

EXPERIMENTS: dict[str, tuple[type[ExperimentConfig], Callable[[Any], dict]]] = {
    "depth-extrapolation": (depth_extrapolation.DepthExtrapolationConfig, depth_extrapolation.run),
    "param-efficiency": (param_efficiency.ParamEfficiencyConfig, param_efficiency.run),
    "stability": (stability.StabilityConfig, stability.run),
    "act-pareto": (act_pareto.ActParetoConfig, act_pareto.run),
}


def run_experiment(name: str, **fields: Any) -> dict:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    config_cls, run = EXPERIMENTS[name]
    cfg = config_cls(**fields)
    cfg.given = frozenset(fields)  # the fields set by the caller, which --smoke keeps
    return run(cfg)

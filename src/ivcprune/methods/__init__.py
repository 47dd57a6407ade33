"""Pruning methods: one small dataclass per file, one registry, one factory.

Every front door (Python, CLI, eval, bench, lmms-eval) finds methods here by name; CLI flags come from
the dataclass fields. Adding a method is one file plus one :func:`register` line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import PruningMethod, RankedMethod, knob_fields, paper_layer
from .cdpruner import CDPruner
from .combined import with_ivc
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .ivc import IVCPrune, Preset, preset_for
from .pdrop import PDrop
from .random import RandomPrune
from .visionzip import VisionZip


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type[PruningMethod]
    label: str
    fixed: dict[str, Any] = field(default_factory=dict)  # knobs this name sets (ablations)


REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, cls: type[PruningMethod], label: str | None = None, **fixed: Any) -> None:
    """Make ``cls`` (with the knobs ``fixed``) reachable by ``name`` from every front door."""
    if name in REGISTRY or name == "none":
        raise ValueError(f"method name {name!r} is taken")
    REGISTRY[name] = MethodEntry(name, cls, label or cls.label, dict(fixed))


register("ivc", IVCPrune)
register("random", RandomPrune)
register("ivc_only", IVCPrune, "IVC only", ablation="ivc_only")
register("no_ivc", IVCPrune, "foreground only", ablation="no_ivc")
register("no_foreground", IVCPrune, "IVC tokens alone", ablation="no_foreground")
register("fastv", FastV)
register("pdrop", PDrop)
FastVWithIVC = with_ivc(FastV)
PDropWithIVC = with_ivc(PDrop)
register("fastv+ivc", FastVWithIVC)
register("pdrop+ivc", PDropWithIVC)
register("visionzip", VisionZip)
register("dart", DART)
register("divprune", DivPrune)
register("cdpruner", CDPruner)


def method_names(*, with_none: bool = True) -> tuple[str, ...]:
    """Every registered name (``none``, the unpruned model, first)."""
    return (("none",) if with_none else ()) + tuple(REGISTRY)


def method_label(name: str) -> str:
    return "unpruned" if name == "none" else REGISTRY[name].label


def make_method(name: str, **knobs: Any) -> PruningMethod | None:
    """The method registered as ``name`` (``none`` gives ``None``); knobs given as ``None`` take the
    method's default / the model's preset. A knob the method does not have is an error."""
    if name == "none":
        return None
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    given = {k: v for k, v in knobs.items() if v is not None}
    allowed = {f.name for f in knob_fields(entry.cls)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(f"method {name!r} has no knob {', '.join(unknown)}; its knobs: {', '.join(sorted(allowed))}")
    clash = sorted(k for k in given if k in entry.fixed and given[k] != entry.fixed[k])
    if clash:
        raise ValueError(f"method {name!r} fixes {', '.join(clash)}")
    return entry.cls(**{**given, **entry.fixed})


__all__ = ["PruningMethod", "RankedMethod", "IVCPrune", "RandomPrune", "FastV", "PDrop", "FastVWithIVC",
           "PDropWithIVC", "VisionZip", "DART", "DivPrune", "CDPruner",
           "with_ivc", "Preset", "preset_for", "paper_layer", "REGISTRY",
           "MethodEntry", "register", "make_method", "method_names", "method_label", "knob_fields"]

"""The runs of one evaluation: every method x budget x K combination."""

from __future__ import annotations


def grid(methods: list[str], budgets: list[float | None], layers: list[int | None]):
    """(run name, method, budget, layer) for every combination; the unpruned run once."""
    runs = []
    for m in methods:
        if m == "none":
            runs.append(("none", m, None, None))
            continue
        for b in budgets:
            for k in layers:
                parts = [m]
                if b is not None:
                    parts.append(f"b{b:g}")
                if k is not None and len(layers) > 1:
                    parts.append(f"k{k}")
                runs.append(("-".join(parts), m, b, k))
    return runs

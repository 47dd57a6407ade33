"""Bridges to evaluation frameworks. Each lives in its own module and imports its framework itself, so
importing :mod:`ivcprune` never imports them.

- :mod:`ivcprune.integrations.lmms_eval`: the lmms-eval model ``ivcprune`` (any lmms-eval task, pruned).
"""

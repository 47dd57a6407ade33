"""The module lmms-eval imports for the plugin model ``ivcprune``."""

from ivcprune.integrations.lmms_eval import IVCPruneLMM

__all__ = ["IVCPruneLMM"]

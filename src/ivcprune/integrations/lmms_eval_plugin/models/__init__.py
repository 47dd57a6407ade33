"""What ``LMMS_EVAL_PLUGINS=ivcprune.integrations.lmms_eval_plugin`` reads: model name -> class name,
the class living in the submodule of the same name (``models/ivcprune.py``)."""

AVAILABLE_MODELS = {"ivcprune": "IVCPruneLMM"}

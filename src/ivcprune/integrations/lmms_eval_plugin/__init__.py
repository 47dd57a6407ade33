"""Registration of the lmms-eval model ``ivcprune`` (:class:`ivcprune.integrations.lmms_eval.IVCPruneLMM`).

Two ways, both supported by lmms-eval 0.7:

- the entry point group ``lmms_eval.models``: ivcprune's ``pyproject.toml`` declares
  ``ivcprune = "ivcprune.integrations.lmms_eval_plugin:model_manifests"``, so an installed ivcprune is
  found by ``lmms-eval --model ivcprune`` with nothing else to set;
- the older plugin variable: ``LMMS_EVAL_PLUGINS=ivcprune.integrations.lmms_eval_plugin`` makes lmms-eval
  read :data:`models.AVAILABLE_MODELS` and add the (empty) ``tasks`` folder to its task search path.

Nothing here imports lmms-eval before lmms-eval asks for the model.
"""

from __future__ import annotations

MODEL_NAME = "ivcprune"
MODEL_CLASS_PATH = "ivcprune.integrations.lmms_eval.IVCPruneLMM"


def model_manifests():
    """The ``lmms_eval.models`` entry point: the manifest of the ``ivcprune`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)]

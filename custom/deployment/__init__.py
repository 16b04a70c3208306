"""Deployment without the bundle: the network and the paper's maps as one exported program, and what a
deployment runs beside it.

- ``exported_model``: ``RpSalMapsModel`` (images -> probabilities and the Sal / Det / Mix maps) and its
  export to ``torch.export`` (``.pt2``) and ONNX (``.onnx``), batch size dynamic. Needs ``custom.networks``.
- ``png``: a radiograph PNG to the network's input with numpy and Pillow, equal to the bundle's preprocessing.
- ``runtime``: ``.pt2`` or ``.onnx`` + ``thresholds.json`` -> findings, with ``custom.localisation`` for the
  boxes. Imports neither MONAI nor any other part of ``custom`` (a test checks ``sys.modules``).

This ``__init__`` imports nothing, so ``custom.deployment.runtime`` stays that light.
"""

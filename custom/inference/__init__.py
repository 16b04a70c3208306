"""Inference as declared in ``inference.yaml``: inputs -> preprocessing -> ``RpSalInferer`` -> postprocessing
transforms (maps -> boxes -> findings document) -> writers, tied by ``RpSalInferenceEvaluator``;
``FindingsService`` runs the same path per image in a long-running process. See docs/architecture.md."""

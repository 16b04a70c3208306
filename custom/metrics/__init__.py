"""Evaluation metrics: AUC, IoU, continuous Dice and T(IoU >= kappa)."""

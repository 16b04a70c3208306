"""Evaluation (paper Sec. 4.3, Tables 1-3): the network's outputs on the test and validation splits, their
scores under the paper's and the held-out two-fold protocols, the thresholds file inference reads, and the
report. Above ``custom.localisation`` and ``custom.metrics``; runs the network through inference's inferer."""

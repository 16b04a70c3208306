"""The RpSal network, one module per part of the paper's Fig. 1."""

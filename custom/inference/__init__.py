"""Inference after the network (paper Fig. 2): Sal/Det/Mix maps and their bounding boxes."""

"""Labelling: the batch labeller and its resume journal, heatmaps, the HTTP service."""

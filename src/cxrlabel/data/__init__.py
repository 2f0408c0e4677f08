"""Data: labels and their formats, splits, statistics, films (decoding, preprocessing, cache),
the training dataset and the discovery of films to label."""

from cxrlabel.data.images import read_image
from cxrlabel.data.labels import apply_policy

__all__ = ["apply_policy", "read_image"]

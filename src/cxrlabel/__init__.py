"""cxrlabel: automatic labelling of chest radiographs with the 14 CheXpert observations."""

__version__ = "0.1.0"

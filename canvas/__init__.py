"""canvas: the UnlearnCanvas benchmark (catalogs, splits, answer sets, classifiers, metrics)."""

__version__ = "0.1.0"

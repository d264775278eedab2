"""The toolkit's version, imported by everyone who records it."""

__version__ = "0.1.0"

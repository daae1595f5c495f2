"""OASIS core: contracts, data model, config, target tree, pipeline and CLI."""

__version__ = "0.1.0"

"""OASIS built-in plugin package oasis_sextractor."""

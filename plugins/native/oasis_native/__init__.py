"""OASIS built-in plugin package oasis_native."""

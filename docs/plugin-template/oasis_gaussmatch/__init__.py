"""oasis-gaussmatch: an example OASIS subtract backend (the plugin template)."""

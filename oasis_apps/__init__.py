"""Applications built on the OASIS engine: the command line, backend comparison, fake-source
efficiency, same-field simulations, archive download (LCO), mosaics, the demo, the
self-test, reports and the OasisPy-compatible API.

They use only the public names of :mod:`oasis_core` (a test keeps it so).
"""

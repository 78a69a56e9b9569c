"""What every layer needs and no layer owns: atomic file writes and the metrics.

Imports nothing else of the project, so models, export, evaluation and ingest can all use it.
"""

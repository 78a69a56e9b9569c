"""The pipeline's steps as plain functions (settings, snapshot, reuse cache, train/export/
evaluate/promote). The Dagster assets in ``orchestration/`` call these and only turn results
into outputs and metadata."""

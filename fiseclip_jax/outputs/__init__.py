"""What a run leaves on disk and what it measures: one atomic writer, the run folder (identity,
resume, overwrite), results, per-image logs, metrics, overlays and the HTML report. No JAX."""

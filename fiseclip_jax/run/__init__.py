"""Runs over files on devices: the towers loaded from checkpoints, fixed-shape batches with top-up,
rounds sharded over a mesh, streams through their ring buffer.

This is the JAX side the programs cross into (`cli/runtime.engine`)."""

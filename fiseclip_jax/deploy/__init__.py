"""Deploying a detector (DESIGN.md §15): the bundle file, the predictor, the exported program, the
service. Floor 6 of the layout: it builds on the scoring loop (`run`) and the outputs."""

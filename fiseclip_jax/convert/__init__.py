"""Checkpoint files: this project's format (`header` without JAX, `checkpoint` to load and save),
and conversion from Hugging Face, OpenAI and open_clip files, which runs no code from them."""

"""Errors that several layers raise: each names the file (or setting) at fault and what was expected."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, with the reason and the file."""


class BadInputError(ValueError):
  """A data file or folder that cannot be used; the message names it and what was expected."""

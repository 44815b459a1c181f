"""User-facing errors: the launcher prints `error: <message>` as one line and exits with 2."""


class UserError(Exception):
  """Bad input from the user (config, data, checkpoint, command line)."""


class CheckpointError(UserError):
  """A checkpoint is missing, malformed, or does not match the model."""


class DataError(UserError):
  """A data file or record is malformed."""

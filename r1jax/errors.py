"""Every user-facing error: the launcher prints `error: <message>` as one line and exits with 2."""


class UserError(Exception):
  """Bad input from the user (config, data, checkpoint, command line)."""


class CheckpointError(UserError):
  """A checkpoint is missing, malformed, or does not match the model."""


class DataError(UserError):
  """A data file or record is malformed."""


class ConfigError(UserError, ValueError):
  """A config value breaks a rule (the message names the field and the rule)."""


class NonFiniteError(UserError):
  """The loss, gradients or updated params went non-finite and train.nonfinite == "stop"."""

"""The errors a user can fix from the message alone. Stages print them as one line and exit with status 2."""


class PipelineError(Exception):
    """Base of the user-facing errors; the message names the file, key or value at fault."""

    exit_status = 2  # the command's exit status: the input cannot be used


class ConfigError(PipelineError, ValueError):
    """A params file that cannot be used; the message names the file, the key and the value."""


class DataError(PipelineError, ValueError):
    """A data or model file that cannot be used; the message names the path and the problem."""


class DivergenceError(PipelineError, RuntimeError):
    """Training produced a non-finite loss; the message names the epoch and the learning rates."""


class BuildError(PipelineError, RuntimeError):
    """The compiled step cannot be built on this machine; the message names what is missing or what failed."""


class TrackingError(PipelineError, RuntimeError):
    """The MLflow tracking store cannot be used; the message names its URI."""


def first_line(error: BaseException) -> str:
    """An exception as one line: parser, Arrow, MLflow and SQLAlchemy messages go on with context, SQL and links."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

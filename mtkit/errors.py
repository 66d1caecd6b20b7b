"""The one exception type a user sees: a message, no traceback."""


class MtkitError(Exception):
    """A problem caused by the user's input (file, config, command line), not by mtkit.

    The CLI prints ``mtkit: error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1


class ConfigError(MtkitError):
    """One or more problems in a config; each problem is one line naming its key path."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

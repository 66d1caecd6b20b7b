"""The one exception type a user sees: a message, no traceback."""

import os


class MtkitError(Exception):
    """A problem caused by the user's input (file, config, command line), not by mtkit.

    The CLI prints ``mtkit: error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1


SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
"""The exit status of a command that SIGINT or SIGTERM stopped (128 + the signal's number)."""


class Stopped(MtkitError):
    """Work stopped on purpose by SIGINT or SIGTERM after saving what it had: not an error,
    and not done either. The CLI prints ``mtkit: <message>`` and exits as the signal would."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = SIGNAL_EXIT[signal_name]


class ConfigError(MtkitError):
    """One or more problems in a config; each problem is one line naming its key path."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def check_cuda_index(index: int, what: str) -> None:
    """MtkitError unless CUDA device ``index`` exists; ``what`` names the setting that asked
    for it. One GPU per process: torchrun's LOCAL_RANK picks it, so on a machine with fewer
    GPUs than processes the ranks past the last GPU would otherwise die in a CUDA traceback."""
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        hint = ""
        if "LOCAL_RANK" in os.environ:
            hint = f" (LOCAL_RANK={os.environ['LOCAL_RANK']}: run at most {count} processes per node)"
        raise MtkitError(f"{what}: cuda:{index} does not exist, this machine has {count} CUDA device(s){hint}")

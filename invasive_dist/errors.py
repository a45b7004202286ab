"""The one exception type for errors a user can cause (config, data, launch), and the exit codes.

Raise :class:`UserError` with a message that names the file, key or sample and says what to do.
The CLI prints it without a traceback and exits with :data:`EXIT_USER_ERROR`; tracebacks are
kept for bugs.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
# Exit code of a run that stopped at a step boundary on SIGTERM/SIGUSR1 after saving a checkpoint.
# Slurm's requeue (or any supervisor) restarts it and `resume=auto` continues from that checkpoint.
EXIT_PREEMPTED = 143


class UserError(Exception):
    """An error caused by the user's input; its message alone must tell them what to fix."""


class Preempted(Exception):
    """Raised after a signal-triggered checkpoint; the CLI exits with :data:`EXIT_PREEMPTED`."""

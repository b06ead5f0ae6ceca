"""The one mark every deliberate failure carries, and the exit codes the CLI gives them.

``UserError`` is raised where the factory stops on purpose: a config that cannot run, a lock another run holds,
shards that failed as a whole, a publishing gate that held. Its message already says what happened and what to
do, so the CLI prints it as one line (polite/cli/common.py), and a flow run that ends with it is logged without
the traceback Prefect would add to it (flows/common.py); an error without the mark keeps its traceback, because
it is a bug to read.

``Busy`` marks the one kind a scheduler should retry rather than report: another process holds what the command
needs (a workspace lock, the lineage database). The CLI exits with ``EXIT_BUSY`` (75, ``EX_TEMPFAIL`` of
sysexits.h) for it, and with ``EXIT_USER_ERROR`` (2) for every other ``UserError`` (docs/operations.md).
"""

EXIT_SHARDS_FAILED = 1  # some shards failed as a whole; the rest are recorded: the same command resumes
EXIT_USER_ERROR = 2  # fix the config or the command line (the message says what)
EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the workspace or its database; try again later


class UserError(Exception):
    """A failure whose message says what to fix; mixed into the concrete error classes."""


class Busy(UserError):
    """Another process holds what this one needs; nothing is wrong with the request: try again later."""


class NoTrainingPairs(UserError, ValueError):
    """Nothing in the training set can be trained on; the message says what was skipped and why."""

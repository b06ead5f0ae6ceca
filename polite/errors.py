"""The one mark every deliberate failure carries.

``UserError`` is raised where the factory stops on purpose: a config that cannot run, a lock another run holds,
shards that failed as a whole, a publishing gate that held. Its message already says what happened and what to
do, so the CLI prints it as one line (polite/cli/common.py), and a flow run that ends with it is logged without
the traceback Prefect would add to it (flows/common.py); an error without the mark keeps its traceback, because
it is a bug to read.
"""


class UserError(Exception):
    """A failure whose message says what to fix; mixed into the concrete error classes."""


class NoTrainingPairs(UserError, ValueError):
    """Nothing in the training set can be trained on; the message says what was skipped and why."""

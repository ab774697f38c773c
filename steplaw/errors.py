"""The one exception type for user mistakes.

Anything a user can get wrong (a malformed table, a missing file, an impossible
config, a NaN where a number was expected) raises `UserError` with one sentence that
names the bad value and what was expected. The CLI prints that sentence and exits 2,
never a traceback. Bugs raise anything else and do show a traceback.
"""


class UserError(ValueError):
    """A user mistake, with a message fit to print as is."""

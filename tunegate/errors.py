"""The one exception type for mistakes a user can fix; CLIs and stage mains print it as one line."""


class UserError(Exception):
    """A problem with the user's input or environment, stated in one line that says what to change."""

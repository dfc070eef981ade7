"""The one exception type for mistakes a user can fix; CLIs and stage mains print it as one line."""


class UserError(Exception):
    """A problem with the user's input or environment, stated in one line that says what to change."""


def yaml_error(path: object, err: Exception) -> UserError:
    """The one line for a file that is not valid YAML: the parser's message on one line, 200 characters at most."""
    return UserError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})")

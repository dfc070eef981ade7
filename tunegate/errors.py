"""The one exception type for mistakes a user can fix; CLIs and stage mains print it as one line."""


class UserError(Exception):
    """A problem with the user's input or environment, stated in one line that says what to change."""


def yaml_error(path: object, err: Exception) -> UserError:
    """The one line for a file that is not valid YAML: the parser's message on one line, 200 characters at most."""
    return UserError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})")


def first_line(err: BaseException) -> str:
    """`Type: the first line of its message` (200 characters at most), for a library's error inside ours."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__

"""The one exception type that reaches users as a message rather than a traceback."""


class Lora2ggufError(Exception):
    """A problem with the user's input or environment.

    The message must name the file (and key or tensor) at fault, because the CLI prints it
    as the whole explanation and exits with status 2.
    """

"""The one error type users see for bad input: the CLI prints it as a single line and exits 2."""


class InputError(Exception):
    """Bad input: the message names the file (and line, row or key) and what was expected."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem

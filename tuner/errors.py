"""The user-error type. main() turns it into one message and exit code 2, with no traceback."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """One or more problems with the user's input, each naming the flag, the value and the fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def report_and_exit(error: Exception, code: int = 2) -> None:
    """One message, no traceback: exit 2 for the user's input, another code for a run that failed."""
    problems = getattr(error, "problems", [str(error)])
    count = len(problems)
    header = "error:" if count == 1 else f"{count} problems:"
    body = "".join(f"\n  - {p}" for p in problems) if count > 1 else f" {problems[0]}"
    print(f"{header}{body}", file=sys.stderr)
    raise SystemExit(code)

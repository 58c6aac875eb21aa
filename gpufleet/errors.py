"""Errors a user can act on, and the exit codes scripts can rely on."""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, but something on a host is not right (unreachable, error)
EXIT_USAGE = 2  # bad config, bad arguments: nothing was done
EXIT_DENIED = 3  # no token, a bad token, or not allowed (HTTP 401, 403, 429): nothing was done
EXIT_INTERRUPTED = 130


class GpufleetError(Exception):
    """Base for errors shown to the user as a message, never a traceback."""

    exit_code = EXIT_FAILED


class UsageError(GpufleetError):
    exit_code = EXIT_USAGE


class NotFound(GpufleetError):
    """No run, fleet or event of that name (HTTP 404)."""


class Unauthorized(GpufleetError):
    """No token, or a token no user has (HTTP 401)."""

    exit_code = EXIT_DENIED


class Forbidden(GpufleetError):
    """A known user asking for what their roles do not allow, or a run breaking a fleet's policy
    (HTTP 403); the message says what is missing."""

    exit_code = EXIT_DENIED


@dataclass
class ConfigProblem:
    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        prefix = f"{self.field}: " if self.field else ""
        return f"{where}: {prefix}{self.message}"


@dataclass
class ConfigError(GpufleetError):
    problems: list[ConfigProblem] = field(default_factory=list)
    exit_code = EXIT_USAGE

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

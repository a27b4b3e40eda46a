"""Typed errors for problems the user can fix (paths, checksums, network, options).

The CLI prints these as one clear message and exits non-zero; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class LoadgenError(Exception):
    """Base class: a user-caused problem with a message that says what to do."""


class TraceNotFoundError(LoadgenError):
    """A trace file is missing and could not be downloaded."""


class TraceChecksumError(LoadgenError):
    """A trace file's sha256 does not match the published one."""


class TraceFormatError(LoadgenError):
    """A trace file is not a `TIMESTAMP,ContextTokens,GeneratedTokens` CSV."""


class TokenizerError(LoadgenError):
    """The target model's tokenizer could not be loaded or cannot build a prompt."""


class BenchConfigError(LoadgenError):
    """Contradictory or incomplete benchmark options."""


class TargetUnavailableError(LoadgenError):
    """The endpoint under test did not answer the preflight request."""


class RunDirectoryError(LoadgenError):
    """A directory given to `bench compare` holds no benchmark result."""

"""Errors a planner user can cause and fix: bad paths, bad specs, missing profiles.

They carry a message meant for the terminal; the CLI prints it and exits 2
instead of showing a traceback.
"""

from __future__ import annotations


class PlannerError(ValueError):
    """Base class: something the user asked for cannot be done as asked."""


class ProfileError(PlannerError):
    """A profile CSV is missing, malformed, or lacks the model/hardware asked for."""


class TraceError(PlannerError):
    """A trace cannot be found or read."""


class SpecError(PlannerError):
    """An SLO, machine or design specification does not parse or is inconsistent."""

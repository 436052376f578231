"""Error types of graphpress.

Every error names the problem and the fix. They share one base class so callers can
catch everything graphpress raises with ``except GraphpressError``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackendError",
    "ContractViolation",
    "GraphpressError",
    "InputError",
    "MetadataError",
    "MissingArtifactError",
    "PassError",
    "PipelineError",
    "TraceError",
]


class GraphpressError(Exception):
    """Base class of every error graphpress raises on purpose."""


class InputError(GraphpressError, TypeError):
    """Example inputs or arguments of the wrong type or shape."""


class TraceError(GraphpressError):
    """A frontend could not turn the model into a Program."""


class PipelineError(GraphpressError, ValueError):
    """A pipeline could not be built: unknown pass name, wrong pass arguments."""


class PassError(GraphpressError):
    """A pass raised, or could not apply for a reason it states."""


class MetadataError(PassError):
    """A pass left the Program inconsistent (graph lint, signature, shape metadata)."""


class ContractViolation(PassError):
    """A pass broke its declared numerical contract."""


class BackendError(GraphpressError):
    """A backend is unavailable or could not lower the Program."""


class ArtifactError(GraphpressError):
    """A saved folder cannot be loaded: damaged, incomplete, too new, or missing an op library."""


class MissingArtifactError(ArtifactError, FileNotFoundError):
    """A file a saved folder needs (its manifest included) is not there."""

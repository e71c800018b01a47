"""Exceptions raised by swarmtrain.

    SwarmError                      base class: everything swarmtrain raises on purpose
    ├── AveragingError              a sync round could not be completed (the caller retries)
    │   ├── MatchmakingError        no usable group: leader gone, group closed, timeouts
    │   └── AllReduceError          the transfer failed or its result failed verification
    ├── StateError                  a model state (checkpoint or download) is unusable
    │   ├── StateMovedError         the donors moved on to a newer state during a download
    │   └── ModelMismatchError      the model's parameter schema differs from the swarm's
    ├── NetworkError                the DHT could not be started or reached
    ├── AccessError                 a private run refused this peer (wrong or missing credential)
    ├── ConfigError                 a config value, flag or file is invalid (also a ValueError)
    ├── DataError                   the training data cannot be loaded or sampled (also a ValueError)
    └── CodecError                  a wire message cannot be decoded (also a ValueError)
        └── SparseError             a sparse message is malformed (averaging/sparse.py)

The last three are also ValueErrors: `__post_init__` validation raises plain ValueErrors,
which the config loader turns into one-line ConfigErrors, and callers that catch ValueError
keep working. Every message is one line that names the problem.
"""
from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error swarmtrain raises deliberately."""


class AveragingError(SwarmError):
    """A sync round failed. Parameters are left exactly as they were before the round."""


class MatchmakingError(AveragingError):
    """No group could be formed or joined for this round."""


class AllReduceError(AveragingError):
    """The all-reduce failed, timed out, or produced a result that failed verification."""


class StateError(SwarmError):
    """A model state (checkpoint file or downloaded state) cannot be used."""


class StateMovedError(StateError):
    """The donors moved on to a newer state during a download: read the records again and retry.
    Nobody is to blame (a round ended), so no donor gets a strike for it."""


class ModelMismatchError(StateError):
    """The local model's parameter schema (names, shapes, dtypes) differs from the swarm's."""


class NetworkError(SwarmError):
    """The DHT could not be started, or none of the initial peers answered."""


class AccessError(SwarmError):
    """The run's nodes refused this peer's records: it is a private run and this peer's secret
    or key does not match. Raised at start, within a bounded time, instead of training alone."""


class ConfigError(SwarmError, ValueError):
    """A configuration value, command-line flag or config file is invalid (one line, naming it)."""

    def __init__(self, message: object) -> None:  # always one line, whatever the message
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


class DataError(SwarmError, ValueError):
    """The configured data cannot be loaded or sampled (missing, unreadable, corrupt, too small)."""


class CodecError(SwarmError, ValueError):
    """A wire message cannot be decoded (wrong size, bad header, non-finite values)."""

"""The scorer contract and the registry of modes (no torch here: both backends and the CLI read it).

A scorer is one way of scoring with its settings. Its ``kind`` tells the pipeline how to feed it:

- ``"images"``: each batch on its own (``score(backend, batch) -> (maps, scores)``): head, references;
- ``"set"``: the features of a whole set first, then ``score_set(backend, features, digests) -> grids``: batch;
- ``"stream"``: each image's features as it comes (``feed``/``flush``): batch mode over a rolling window.

Nothing outside this module tests a mode by name, type or attribute: code asks the scorer (``kind``,
``describe()``, ``holdout()``) or the registry (:func:`create`, :func:`names`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type, TypeVar

KINDS = ("images", "set", "stream")
#: the next step of a run without a threshold, in any mode (the CLI's summary says "no threshold, so no decisions"
#: before it)
NO_THRESHOLD = "calibrate on good parts of the product (visualad calibrate GOOD_DIR --false-alarm-rate R)"


class Scorer:
    """Base of every mode; subclasses set ``name`` and ``kind`` and register with :func:`register`."""

    name: str = ""
    kind: str = "images"
    #: part of the auto rule's vocabulary and of ``--mode`` (the stream scorer is reached by ``det.stream``)
    selectable: bool = True

    @classmethod
    def from_settings(cls, *, references: Any = None, compare_with: int = 64, seed: int = 0) -> "Scorer":
        """The scorer of a call from the settings every call has; each mode takes what it needs."""
        return cls()

    def describe(self) -> Dict[str, Any]:
        """What thresholds record about the scorer (a threshold holds only for the same description)."""
        return {"mode": self.name}

    def why(self, n_images: int, head_trained: bool) -> str:
        """Why this mode scores a call of ``n_images`` images, in a few words (the CLI says it)."""
        return "as asked"

    def next_step(self, labelled: bool, n_normal: Optional[int]) -> str:
        """What to do after a run in this mode, in a few words (the CLI's summary): ``labelled`` says whether
        results had a threshold, ``n_normal`` how many normal images calibrated it (None: set by hand)."""
        return "" if labelled else NO_THRESHOLD

    def holdout(self, digest: str) -> "Scorer":
        """The scorer for an input that may be part of the scorer's own evidence (calibrating references on
        the references themselves): leave-one-out where the mode needs it, else itself."""
        return self


_REGISTRY: Dict[str, Type[Scorer]] = {}
S = TypeVar("S", bound=Type[Scorer])


def register(cls: S) -> S:
    """Class decorator: make a mode known by its ``name``."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> Tuple[str, ...]:
    """The modes a user can name, in registration order."""
    return tuple(n for n, c in _REGISTRY.items() if c.selectable)


def create(name: str, **settings: Any) -> Scorer:
    """The registered mode ``name`` built from the call's settings."""
    from ..errors import ConfigError

    if name not in _REGISTRY or not _REGISTRY[name].selectable:
        raise ConfigError(f"unknown mode {name!r}; known: {names()}")
    return _REGISTRY[name].from_settings(**settings)


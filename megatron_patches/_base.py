"""The registry every patch in this package goes through.

A patch is a small, named change to megatron-core behaviour. Each declares:
  * ``name``     - stable identifier (used in logs, tests and ``SCIDFM_DISABLE_PATCHES``);
  * ``when``     - ``"always"``, ``"no_te"`` (TransformerEngine absent) or ``"cpu"`` (CUDA absent);
  * ``summary``  - one line: what it changes;
  * ``why``      - the failure it fixes, in megatron-core's own words where possible;
  * ``targets``  - the megatron-core internals it relies on, as ``(module, attribute, params)``,
                   where ``params`` are parameter names the callable must still accept. The test suite
                   checks every target, so an upgrade that moves an internal fails loudly in CI instead
                   of silently un-patching.
  * ``apply``    - a function that installs it. It must not change numerics.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

WHEN_VALUES = ("always", "no_te", "cpu")


@dataclass(frozen=True)
class Target:
    """A megatron-core attribute a patch replaces, with the parameters it relies on: checked for drift on upgrade."""
    module: str
    attribute: str
    params: Sequence[str] = ()

    def resolve(self):
        obj = importlib.import_module(self.module)
        for part in self.attribute.split("."):
            obj = getattr(obj, part)
        return obj

    def check(self) -> str | None:
        """Return None if the target is where the patch expects it, else a description of the drift."""
        try:
            obj = self.resolve()
        except (ImportError, AttributeError) as exc:
            return f"{self.module}.{self.attribute} not found ({exc})"
        if self.params:
            fn: Any = inspect.unwrap(obj)  # a function, or a class whose __init__ holds the parameters
            if inspect.isclass(fn):
                fn = fn.__init__
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                return f"{self.module}.{self.attribute} has no inspectable signature"
            missing = [p for p in self.params if p not in sig.parameters]
            if missing:
                return (f"{self.module}.{self.attribute} no longer takes {missing} "
                        f"(signature now {sig})")
        return None


@dataclass(frozen=True)
class Patch:
    """A named change to megatron-core: when it applies, why, what it touches and how to apply it."""
    name: str
    when: str
    summary: str
    why: str
    targets: Sequence[Target]
    apply: Callable[[], None] = field(repr=False)

    def __post_init__(self):
        if self.when not in WHEN_VALUES:
            raise ValueError(f"patch {self.name}: when={self.when!r} not in {WHEN_VALUES}")

    def drift(self) -> list[str]:
        """Targets that moved or changed signature; empty when the patch still fits."""
        return [msg for msg in (t.check() for t in self.targets) if msg]


def wrap_once(owner, name: str, make: Callable):
    """Replace ``owner.name`` by ``make(original)``, once: the replacement is marked, and a second call
    (``apply()`` is idempotent) finds the mark and leaves it. Returns the installed callable."""
    orig = getattr(owner, name)
    if getattr(orig, "__scidfm_patched__", False):
        return orig
    new = make(orig)
    mark_patched(new)
    setattr(owner, name, new)
    return new


def mark_patched(fn: Any, **attrs: Any) -> None:
    """Mark a replacement callable as installed by a patch (``wrap_once`` and the patches' ``apply`` look for
    the mark, so applying twice installs once), with ``attrs`` set beside it (e.g. ``__wrapped_original__``)."""
    fn.__scidfm_patched__ = True
    for k, v in attrs.items():
        setattr(fn, k, v)


def caller_is_megatron(depth: int = 2) -> bool:
    """True when the frame ``depth`` levels above the caller belongs to megatron-core.

    Used by patches that alter a torch-wide entry point (tensor factories, ``Tensor.type``): they act
    only on calls made *by megatron-core*, so user code on a CPU machine that asks for ``"cuda"`` still
    gets torch's own error.
    """
    import sys

    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "").startswith("megatron.core")

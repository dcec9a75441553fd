"""Name -> plugin registries for methods and tasks.

Built-in plugins register themselves when their module is imported; third-party packages add
methods through the `moebench.methods` entry-point group (the value points at a module or an
object; loading it is what registers). Entry points load lazily, on the first lookup, so a broken
third-party plugin does not break `import moebench`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import types
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from moebench.errors import unknown

log = logging.getLogger(__name__)

T = TypeVar("T")

# Where method plugins come from; named here so the CLI can list the names without torch.
METHOD_PACKAGE = "moebench.methods"
METHOD_GROUP = "moebench.methods"


class Registry(Generic[T]):
    """A mapping from names to plugins, filled by built-in modules and entry points."""

    def __init__(
        self,
        kind: str,
        builtin_modules: tuple[str, ...],
        group: str | None,
        builtin_package: str | None = None,
    ) -> None:
        self.kind = kind
        self._builtin_modules = builtin_modules
        self._builtin_package = builtin_package
        self._group = group
        self._items: dict[str, T] = {}
        self._loaded = False
        # Plugins skipped while loading (broken, or a name taken), one sentence each: a listing
        # that skipped one is not cached (moebench.method_listing), so the warning shows each time.
        self.problems: list[str] = []

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form: `@METHODS.register("lora")`."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        modules = list(self._builtin_modules)
        if self._builtin_package is not None:
            # Every module dropped into the package is a plugin: adding a method is one file.
            package = importlib.import_module(self._builtin_package)
            modules += [
                f"{self._builtin_package}.{info.name}"
                for info in pkgutil.iter_modules(package.__path__)
                if not info.name.startswith("_")
            ]
        for module in modules:
            importlib.import_module(module)
        if self._group is None:
            return
        for ep in entry_points(group=self._group):
            if ep.name in self._items:
                self.problems.append(f"{ep.name} from {ep.value}: the name is already registered")
                log.warning(
                    "%s plugin '%s' from %s is ignored: that name is already registered",
                    self.kind,
                    ep.name,
                    ep.value,
                )
                continue
            try:
                obj = ep.load()
            except Exception:  # a broken plugin must not hide the working ones
                self.problems.append(f"{ep.name} from {ep.value}: it could not be loaded")
                log.exception("could not load %s plugin '%s' from %s", self.kind, ep.name, ep.value)
                continue
            if ep.name not in self._items and not isinstance(obj, types.ModuleType):
                self.add(ep.name, obj)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __iter__(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def declared_names(self) -> list[str]:
        """The names, read without importing a plugin (and so without torch): a built-in module
        `foo_bar.py` registers `foo-bar` (tests/test_methods.py holds every plugin to that), and an
        entry point's name is its plugin's. For rejecting a misspelt name in well under a second."""
        names = set(self._items)
        if self._builtin_package is not None:
            package = importlib.import_module(self._builtin_package)
            names |= {
                info.name.replace("_", "-")
                for info in pkgutil.iter_modules(package.__path__)
                if not info.name.startswith("_")
            }
        if self._group is not None:
            names |= {ep.name for ep in entry_points(group=self._group)}
        return sorted(names)

    def check_declared(self, name: str) -> None:
        """Raise the standard unknown-name error for a name no plugin declares."""
        choices = self.declared_names()
        if name not in choices:
            raise unknown(self.kind, name, choices)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


def declared_method_names() -> list[str]:
    """Method names as `Registry.declared_names` reads them, importing no plugin."""
    return Registry[object]("method", (), METHOD_GROUP, METHOD_PACKAGE).declared_names()

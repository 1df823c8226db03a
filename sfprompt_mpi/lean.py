"""A rank without ``torch._dynamo`` nor sympy: their imports are deferred until something needs them.

Every rank imports torch, torchvision and timm, and with them ``torch._dynamo``, the
``torch.compile`` front end this project never uses: torchvision's ``ops`` import one helper
from it, and torch's optimisers call its no-op ``graph_break`` and wrap methods with
``torch._disable_dynamo`` (which imports it on first call). That import is 1.5-1.9 s of CPU and
0.07 GB of private memory per process (sympy included), a third of a rank's imports.
Without it, sympy still came with ``torch.fx.experimental.symbolic_shapes``, which autograd
imports for two helpers on the first backward given an explicit gradient (the server's body, a
split client's head): 0.55 s of CPU and 0.035 GB per process.

:func:`defer_imports` puts a stand-in module in the place of each. In eager execution, which is
all a run does, a stand-in gives exactly what the real module gives:

- ``torch._dynamo``: ``disable(fn)`` returns ``fn`` itself (dynamo's wrapper only changes what
  happens while dynamo traces, and nothing here is traced); ``graph_break()`` does nothing, as
  the real one does outside a trace; ``is_compiling()`` is False; ``utils.is_compile_supported``
  loads the real module when it is called.
- ``torch.fx.experimental.symbolic_shapes``: ``sym_eq`` of plain ints and tuples of them is ``==``,
  ``expect_true`` of a plain bool is that bool; any symbolic argument goes to the real functions.

Anything else (``torch.compile``, ``torch._dynamo.config``, an import of one of its submodules
by another library, such as peft's transformers; meta kernels that need symbolic shapes, as the
FLOP counting of ``--devices`` runs does) loads the real module at that moment and goes on with
it, so a process that does need it still gets it, later. The parameters a run ends with are
bitwise those of a process that imported both (tested). Set ``SFPROMPT_KEEP_DYNAMO=1`` to import
them as usual.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

NAME = "torch._dynamo"
_UTILS = NAME + ".utils"
SHAPES = "torch.fx.experimental.symbolic_shapes"
_stand_ins: dict[str, "_Deferred"] = {}
#: What loaded each deferred module that has been loaded for real: the attribute first asked of its
#: stand-in (``"torch.fx.experimental.symbolic_shapes.ShapeEnv"``), or "load" for an explicit :func:`load`.
#: Where a torch release asks a stand-in for more in a plain run, this names what it asked.
LOADED_BY: dict[str, str] = {}


@contextmanager
def importing_for_good() -> Iterator[None]:
    """Inside: a process's first import of torch and the run's modules, with the cyclic garbage
    collector paused; after: every object alive then, nearly all built by those imports, is frozen
    (``gc.freeze``): out of every later collection, so never collected should it become cyclic garbage.

    Those objects (modules, operator registrations, a few hundred thousand) live as long as the
    process, yet each full collection walks them all: three ran inside ``import torch`` and each
    later one (a lazy import, the collection after setup) took 0.1-0.15 s; a small run's process
    spends 0.6-0.9 s of CPU less (docs/benchmarks.md). Where torch is imported already (a test
    calling ``main`` in its own process), this does nothing.
    """
    fresh = "torch" not in sys.modules
    enabled = gc.isenabled()
    if fresh:
        gc.disable()
    try:
        yield
    finally:
        if fresh:
            gc.freeze()
            if enabled:
                gc.enable()


def defer_imports() -> bool:
    """Install the stand-ins (before torchvision, timm or an optimiser load the real modules)
    -> whether ``torch._dynamo``'s is in place. Leaves alone a module that is loaded already, and
    does nothing where ``SFPROMPT_KEEP_DYNAMO`` is set to anything but 0 or empty."""
    if os.environ.get("SFPROMPT_KEEP_DYNAMO", "0") not in ("", "0"):
        return False
    import torch
    import torch.fx.experimental  # the parent package the shapes stand-in is set on
    _defer_shapes(torch.fx.experimental)
    if NAME in sys.modules:
        return isinstance(sys.modules[NAME], _Deferred)
    find = importlib.machinery.PathFinder.find_spec
    spec = find(NAME, list(torch.__path__))
    utils_spec = spec and find(_UTILS, list(spec.submodule_search_locations or []))
    if utils_spec is None:  # not the torch this was written for: import it as usual
        return False
    top, utils = _Deferred(NAME), _Deferred(_UTILS)
    top.__spec__, utils.__spec__ = spec, utils_spec  # importlib.util.find_spec answers as for the real one
    top.disable = _disable
    top.graph_break = _graph_break
    top.is_compiling = _is_compiling
    top.utils = utils
    utils.is_compile_supported = _is_compile_supported
    _install(top, torch, "_dynamo")
    _install(utils)
    return True


def _defer_shapes(parent: types.ModuleType) -> None:
    spec = importlib.machinery.PathFinder.find_spec(SHAPES, list(parent.__path__))
    if SHAPES in sys.modules or spec is None:
        return
    shapes = _Deferred(SHAPES)
    shapes.__spec__ = spec
    shapes.sym_eq = _sym_eq
    shapes.expect_true = _expect_true
    _install(shapes, parent, "symbolic_shapes")


def _install(module: "_Deferred", parent: types.ModuleType | None = None, attr: str = "") -> None:
    module._parent, module._attr = parent, attr
    _stand_ins[module.__name__] = sys.modules[module.__name__] = module
    if parent is not None:
        setattr(parent, attr, module)


def deferred(name: str = NAME) -> bool:
    """Whether module ``name`` is still a stand-in (the real module was never needed)."""
    return isinstance(sys.modules.get(name), _Deferred)


def dynamo_deferred() -> bool:
    """Whether ``torch._dynamo`` is still the stand-in."""
    return deferred(NAME)


def load(name: str) -> types.ModuleType:
    """The real module ``name`` (a deferred one: ``torch._dynamo`` with its submodules, or the
    symbolic shapes), imported now if its stand-in is still in its place."""
    if deferred(name):
        LOADED_BY.setdefault(name, "load")
        for key, module in list(_stand_ins.items()):
            if (key == name or key.startswith(name + ".")) and sys.modules.get(key) is module:
                del sys.modules[key]
                if module._parent is not None and getattr(module._parent, module._attr, None) is module:
                    delattr(module._parent, module._attr)
    return importlib.import_module(name)


def load_dynamo() -> types.ModuleType:
    """The real ``torch._dynamo``, imported now if the stand-in is still in its place."""
    return load(NAME)


class _Deferred(types.ModuleType):
    """A stand-in: the few eager answers set on it, everything else from the real module."""

    _parent: types.ModuleType | None = None
    _attr = ""

    def __getattr__(self, name: str) -> Any:
        package = name == "__path__" and self.__name__ == NAME  # only torch._dynamo is a package
        if name.startswith("__") and not package:
            raise AttributeError(name)
        top = NAME if self.__name__.startswith(NAME) else self.__name__
        LOADED_BY.setdefault(top, f"{self.__name__}.{name}")
        load(top)
        if package:
            # The import system asks for the parent's __path__ to import a submodule: the real package
            # is loaded now, and if it imported that submodule itself, _Reuse stops a second execution.
            sys.meta_path.insert(0, _Reuse())
        return getattr(importlib.import_module(self.__name__), name)


class _Reuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder for the one submodule import that found the stand-in as its parent: where loading
    the real package imported that submodule already, hand out that module instead of running
    it a second time. It is consulted once and then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(NAME + "."):
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        module = sys.modules.get(fullname)
        if module is None:
            return None
        self._module, self._spec = module, module.__spec__
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set ours; the module keeps its own


def _disable(fn: Callable | None = None, recursive: bool = True, **kwargs: Any) -> Callable:
    return fn if fn is not None else (lambda f: f)


def _graph_break(msg: str = "") -> None:
    return None


def _is_compiling() -> bool:
    return False


def _is_compile_supported(*args: Any, **kwargs: Any) -> Any:
    load_dynamo()
    return importlib.import_module(_UTILS).is_compile_supported(*args, **kwargs)


def _plain_ints(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(type(v) is int for v in x)


def _sym_eq(x: Any, y: Any) -> Any:
    if _plain_ints(x) and _plain_ints(y):
        return len(x) == len(y) and all(a == b for a, b in zip(x, y))
    if type(x) is int and type(y) is int:
        return x == y
    return load(SHAPES).sym_eq(x, y)


def _expect_true(a: Any, skip: int = 0) -> Any:
    if type(a) is bool:
        return a
    return load(SHAPES).expect_true(a, skip + 1)

"""A rank without ``torch._dynamo``: its import is deferred until something really compiles.

Every rank imports torch, torchvision and timm, and with them ``torch._dynamo``, the
``torch.compile`` front end this project never uses: torchvision's ``ops`` import one helper
from it, and torch's optimisers call its no-op ``graph_break`` and wrap methods with
``torch._disable_dynamo`` (which imports it on first call). That import is 1.5-1.9 s of CPU and
0.07 GB of private memory per process (sympy included), a third of a rank's imports.

:func:`defer_dynamo` puts a stand-in module in its place. In eager execution, which is all a run
does, the stand-in gives exactly what the real module gives:

- ``disable(fn)`` returns ``fn`` itself: dynamo's wrapper only changes what happens while
  dynamo traces, and nothing here is traced;
- ``graph_break()`` does nothing, as the real one does outside a trace;
- ``is_compiling()`` is False;
- ``utils.is_compile_supported`` loads the real module when it is called.

Anything else (``torch.compile``, ``torch._dynamo.config``, an import of one of its submodules
by another library, such as peft's transformers) loads the real ``torch._dynamo`` at that moment
and goes on with it, so a process that does need it still gets it, later. The parameters a run
ends with are bitwise those of a process that imported it (tested). Set
``SFPROMPT_KEEP_DYNAMO=1`` to import it as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any, Callable

NAME = "torch._dynamo"
_UTILS = NAME + ".utils"
_stand_ins: dict[str, "_Deferred"] = {}


def defer_dynamo() -> bool:
    """Install the stand-in (before torchvision, timm or an optimiser load the real module)
    -> whether it is in place. Does nothing where the real module is loaded already, or
    where ``SFPROMPT_KEEP_DYNAMO`` is set to anything but 0 or empty."""
    if os.environ.get("SFPROMPT_KEEP_DYNAMO", "0") not in ("", "0"):
        return False
    import torch
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
    _stand_ins.update({NAME: top, _UTILS: utils})
    sys.modules.update(_stand_ins)
    torch._dynamo = top  # type: ignore[attr-defined]
    return True


def dynamo_deferred() -> bool:
    """Whether ``torch._dynamo`` is still the stand-in (the real module was never needed)."""
    return isinstance(sys.modules.get(NAME), _Deferred)


def load_dynamo() -> types.ModuleType:
    """The real ``torch._dynamo``, imported now if the stand-in is still in its place."""
    if dynamo_deferred():
        import torch
        for name, module in _stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        if getattr(torch, "_dynamo", None) is _stand_ins[NAME]:
            del torch._dynamo  # type: ignore[attr-defined]
    return importlib.import_module(NAME)


class _Deferred(types.ModuleType):
    """The stand-in: the few eager no-ops set on it, everything else from the real module."""

    def __getattr__(self, name: str) -> Any:
        package = name == "__path__" and self.__name__ == NAME  # utils is a plain module, not a package
        if name.startswith("__") and not package:
            raise AttributeError(name)
        load_dynamo()
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

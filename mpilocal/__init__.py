"""mpilocal: PyTorch-DTensor-style distributed arrays and ``local_map`` over MPI, without PyTorch.

Each MPI rank holds one shard (a NumPy array on CPU or a CuPy array on its GPU); placements on an
N-D device mesh say how the shards form the global array. See README.md and docs/architecture.md.

``import mpilocal`` itself does not load mpi4py (so the one-process checkpoint reader,
``mpilocal.checkpoint.read_array`` and ``python -m mpilocal.checkpoint ls``, never initializes MPI).
The library starts (:func:`_bootstrap`: the failure handling of ``deadline.install()`` first, then
every public module, the autograd and operator registrations on DTensor included) on the first of:

* access to a public name (``mpilocal.DTensor``, ``from mpilocal import Shard``, ``import *``) or to
  a submodule attribute (``mpilocal.functional``), through the module ``__getattr__`` (PEP 562);
* the import of any submodule other than the no-MPI ones in ``_NO_MPI`` (``import
  mpilocal.functional``, ``from mpilocal.mesh import ...``): a finder on ``sys.meta_path`` installs
  the failure handling before that module runs and imports the rest right after it, so a program
  that never names ``mpilocal.X`` still gets the abort-on-error hook and the deadlines.

Either way the result is what the eager ``import mpilocal`` used to do, in the same order.
"""

import importlib as _importlib
import importlib.machinery as _machinery
import sys as _sys
import threading as _threading

from ._launch import check as _check_launcher

_check_launcher()  # before mpi4py.MPI starts: a launcher/library mismatch gets a clear error, not an abort

__version__ = "0.1.0"

__all__ = [
    "DeviceMesh",
    "init_device_mesh",
    "DTensor",
    "distribute_tensor",
    "local_shape_and_offset",
    "Shard",
    "Replicate",
    "Partial",
    "Placement",
    "local_map",
    "CommDebugMode",
    "stencil",
    "ragged_from_local",
    "zeros",
    "ones",
    "full",
    "empty",
    "rand",
    "randn",
    "manual_seed",
    "no_grad",
]

# The failure handling (abort on uncaught errors, deadlines; see deadline.py): installed first, so its
# exit handler is registered before any other mpilocal one and runs last (atexit is LIFO).
_INSTALL_MODULE = "deadline"

# (module, names) imported by the bootstrap, in this order; (module, None) imports the module itself
# (its registrations: autograd with DTensor, ops' operators on DTensors, last).
_EXPORTS = (
    ("debug", ("CommDebugMode",)),
    ("dtensor", ("DTensor", "distribute_tensor", "local_shape_and_offset")),
    ("local_map", ("local_map",)),
    ("autograd", ("no_grad",)),  # mpilocal.autograd: Tracked, Function; DTensor gradients; torch.no_grad's name
    ("mesh", ("DeviceMesh", "init_device_mesh")),
    ("placement", ("Partial", "Placement", "Replicate", "Shard")),
    ("neighbors", ("stencil",)),  # local_map with halos
    ("ragged", ("ragged_from_local",)),  # sizes agreed from the local arrays
    ("ops", None),  # last: registers the operators on DTensors; a layer above dtensor
    ("ops.random", ("empty", "full", "manual_seed", "ones", "rand", "randn", "zeros")),
    ("optim", None),  # SGD, Adam over DTensors
)

# Submodules that load without MPI (the pure floor of docs/architecture.md, the one-process
# checkpoint reader and its CLI, the flight recorder's reports and `python -m mpilocal`, whose `info`
# starts the library itself): importing them does not start the library.
# tests/test_layers.py holds this set to layer 0 of LAYERS.json.
_PURE = ("placement", "layout", "names", "_arrays", "_pool", "debug")
_NO_MPI = frozenset({__name__ + "." + m for m in _PURE + ("_launch", "checkpoint", "checkpoint._format",
                                                         "checkpoint.__main__", "flight", "__main__")})

_LOCK = _threading.RLock()
_STATE = 0  # 0: not started; 1: starting; 2: started


def _install() -> None:
    _importlib.import_module(f"{__name__}.{_INSTALL_MODULE}").install()


def _import_exports() -> None:
    g = globals()
    for mod, names in _EXPORTS:
        m = _importlib.import_module(f"{__name__}.{mod}")
        for n in names or ():
            g[n] = getattr(m, n)


def _finish() -> None:
    global _STATE
    _STATE = 2
    try:
        _sys.meta_path.remove(_FINDER)
    except ValueError:
        pass


def _bootstrap() -> None:
    """Start the library (idempotent): failure handling, then every public module."""
    global _STATE
    with _LOCK:
        if _STATE:
            return
        _STATE = 1
        try:
            _install()
            _import_exports()
        except BaseException:
            _STATE = 0
            raise
        _finish()


class _ThenBootstrap:
    """Loader wrapper for the first MPI submodule imported before the bootstrap: failure handling
    before it runs (unless it is the failure module itself), the rest of the bootstrap after."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, attr):  # get_source, get_code, ... for tracebacks and tools
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        global _STATE
        loader = self._loader
        module.__loader__ = loader  # the real loader from now on
        if module.__spec__ is not None:
            module.__spec__.loader = loader
        with _LOCK:
            if _STATE:  # started meanwhile (another thread)
                loader.exec_module(module)
                return
            _STATE = 1
            try:
                if module.__name__ != f"{__name__}.{_INSTALL_MODULE}":
                    _install()
                loader.exec_module(module)
                if module.__name__ == f"{__name__}.{_INSTALL_MODULE}":
                    _install()
                _import_exports()
            except BaseException:
                _STATE = 0
                raise
            _finish()


class _Finder:
    """On ``sys.meta_path`` until the bootstrap: wraps the loader of the first MPI submodule."""

    @staticmethod
    def find_spec(fullname, path, target=None):
        if _STATE or not fullname.startswith(__name__ + ".") or fullname in _NO_MPI:
            return None
        spec = _machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ThenBootstrap(spec.loader)
        return spec

    @staticmethod
    def invalidate_caches():
        pass


_FINDER = _Finder()
_sys.meta_path.insert(0, _FINDER)

_PUBLIC = frozenset(__all__)


def __getattr__(name):
    if name in _PUBLIC:
        _bootstrap()
        try:
            return globals()[name]
        except KeyError:  # asked for while the bootstrap runs (a module it imports uses it)
            mod = next(m for m, names in _EXPORTS if names and name in names)
            return getattr(_importlib.import_module(f"{__name__}.{mod}"), name)
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # a submodule (mpilocal.functional, mpilocal.ops, ...): importing it starts the library unless
    # it is one of the no-MPI ones
    try:
        mod = _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return mod


def __dir__():
    return sorted(set(globals()) | _PUBLIC | {m.split(".")[0] for m, _ in _EXPORTS} | {_INSTALL_MODULE})

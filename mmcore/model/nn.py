"""Small NumPy building blocks for the model runtime (``mmcore.model.nn``).

Everything here computes in float32 with NumPy (matrix products go to NumPy's BLAS) and keeps its
weights in the PyTorch layout, so a PyTorch ``state_dict`` converted to NumPy arrays loads as is:
``Linear.weight`` is ``(out_features, in_features)``, ``LayerNorm.weight`` is ``(D,)``.

:class:`Module` is the shared base: named parameters, child modules, ``state_dict()`` and a
validating ``load_state_dict()``. Random initialisation takes ``rng``: ``None`` (fresh entropy, as
:func:`numpy.random.default_rng`), an int seed, or a :class:`numpy.random.Generator` (shared, so a
stack of layers drawn from one generator is reproducible and every layer differs). The same seed
gives the same float32 weights on every platform.

Parameters are immutable: a module keeps every float32 parameter in read-only memory that
cannot be made writeable again (and the arrays of a quantized weight read-only), so an in-place
write (``layer.weight[0, 0] = 1``, ``layer.weight *= 2``) raises ``ValueError: assignment
destination is read-only``. Weights change only through :meth:`Module.load_state_dict`,
:meth:`Module.set_parameter` or :meth:`Module.register_parameter`, each of which replaces the
array and advances :attr:`Module.weights_version`; caches of results (the per-item cache of
:class:`~mmcore.model.MultiModalModel`, the argument cache of the native encoder block) key
on that, so they never serve results of older weights.

Packed weights: the layers read their weight matrices through :meth:`Module.packed_weight`,
packed once per precision and dropped whenever a parameter is replaced (see
:mod:`mmcore.model.packing`).

Examples
--------
>>> import numpy as np
>>> from mmcore.model.nn import Linear, LayerNorm, gelu
>>> lin = Linear(4, 3, rng=0)
>>> x = np.ones((2, 5, 4), np.float32)
>>> y = gelu(LayerNorm(3)(lin(x)))
>>> y.shape, y.dtype
((2, 5, 3), dtype('float32'))
>>> sorted(lin.state_dict())
['bias', 'weight']
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Dict, Iterator, Literal, Mapping, Optional, Tuple, TypeVar, Union

import numpy as np
from numpy.typing import ArrayLike

from ..errors import ConfigError, ModelFormatError, ShapeError
from ..ops.linear import PackedWeight, QuantizedTensor
from ..ops.linear import layer_norm as _ops_layer_norm
from ..ops.linear import linear as _ops_linear
from . import packing as _packing
from .packing import freeze_quantized as _freeze_quantized

__all__ = ["Module", "Linear", "LayerNorm", "gelu", "quick_gelu", "relu", "get_activation",
           "ACTIVATIONS", "as_generator", "xavier_uniform", "check_features", "frozen_array",
           "weights_clock", "NO_INIT", "check_prob", "check_positive", "to_numpy", "state_entry"]


class _NoInit:
    """The type of :data:`NO_INIT` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_INIT"


#: Passed as ``rng`` by ``from_state_dict`` constructors: allocate zeros instead of drawing
#: random weights that are about to be overwritten (:func:`as_generator` turns it into None).
NO_INIT = _NoInit()
_NO_INIT = NO_INIT  # the former private name

#: What an ``rng`` argument takes: None (fresh entropy), an int seed, a Generator, or
#: :data:`NO_INIT`.
RngLike = Union[None, int, np.random.Generator, _NoInit]

#: What an ``activation`` argument takes: a name of :data:`ACTIVATIONS` or a function of a
#: float32 array.
ActivationLike = Union[str, Callable[[np.ndarray], np.ndarray]]

_M = TypeVar("_M", bound="Module")

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------------------------
# initialisation


def as_generator(rng: object) -> Optional[np.random.Generator]:
    """``None`` / int seed / Generator -> Generator (``None`` for the internal no-init marker).

    Examples
    --------
    >>> from mmcore.model.nn import as_generator
    >>> float(as_generator(3).random()) == float(as_generator(3).random())
    True
    """
    if rng is NO_INIT:
        return None
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise ConfigError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")
    if int(rng) < 0:
        raise ConfigError(f"rng seed must be >= 0, got {int(rng)}")
    return np.random.default_rng(int(rng))


def _uniform(gen: Optional[np.random.Generator], shape, bound: float) -> np.ndarray:
    if gen is None:
        return np.zeros(shape, np.float32)
    return gen.uniform(-bound, bound, size=shape).astype(np.float32)


def xavier_uniform(gen: Optional[np.random.Generator], shape: Tuple[int, int]) -> np.ndarray:
    """Glorot/Xavier uniform ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, float32.

    ``shape`` is ``(fan_out, fan_in)`` (the PyTorch weight layout), as
    ``torch.nn.init.xavier_uniform_``.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import xavier_uniform
    >>> w = xavier_uniform(np.random.default_rng(0), (96, 32))
    >>> w.dtype, bool(np.abs(w).max() <= np.sqrt(6 / 128))
    (dtype('float32'), True)
    """
    fan_out, fan_in = shape
    return _uniform(gen, shape, math.sqrt(6.0 / (fan_in + fan_out)))


def check_features(owner: str, name: str, value, *, minimum: int = 1) -> int:
    """A positive integer size argument, or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConfigError(f"[{owner}] {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_prob(owner: str, name: str, value) -> float:
    """A probability in ``[0, 1)`` as a float, or a ConfigError naming it.

    Examples
    --------
    >>> from mmcore.model.nn import check_prob
    >>> check_prob("layer", "dropout", 0.1)
    0.1
    """
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"[{owner}] {name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= p < 1.0):
        raise ConfigError(f"[{owner}] {name} must lie in [0, 1), got {p}")
    return p


def check_positive(owner: str, name: str, value) -> float:
    """A finite number ``> 0`` as a float, or a ConfigError naming it.

    Examples
    --------
    >>> from mmcore.model.nn import check_positive
    >>> check_positive("layer", "eps", 1e-5)
    1e-05
    """
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"[{owner}] {name} must be a finite number > 0, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ConfigError(f"[{owner}] {name} must be a finite number > 0, got {f}")
    return f


_check_prob = check_prob  # the former private names
_check_positive = check_positive


def as_float_input(owner: str, name: str, x, *, ndim: Optional[int] = None,
                   dims: str = "", last: Optional[int] = None, last_name: str = "") -> np.ndarray:
    """Validate an activation tensor and return it as float32 (copying only when needed)."""
    if x is None:
        raise ShapeError(f"[{owner}] {name} is required")
    try:
        a = np.asarray(x)
    except Exception as exc:
        raise ShapeError(f"[{owner}] {name} cannot be converted to an array: {exc}") from None
    if a.dtype not in _FLOAT_DTYPES:
        raise ShapeError(f"[{owner}] {name} has dtype {a.dtype}, expected float32 "
                         "(float16 and float64 are cast)")
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"[{owner}] {name} has {a.ndim} dims (shape {a.shape}), expected "
                         f"{ndim} {dims}")
    if a.ndim == 0:
        raise ShapeError(f"[{owner}] {name} is a scalar, expected an array {dims}".rstrip())
    if last is not None and a.shape[-1] != last:
        raise ShapeError(f"[{owner}] {name} has last dim {a.shape[-1]} (shape {a.shape}), expected "
                         f"{last_name or 'features'} = {last}")
    return a.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# immutable parameters and the weights clock

_clock_lock = threading.Lock()
_clock = [0]


def _tick() -> int:
    """A new value of the process-wide weights clock (strictly increasing)."""
    with _clock_lock:
        _clock[0] += 1
        return _clock[0]


def weights_clock() -> int:
    """The process-wide weights clock: it advances whenever any module anywhere gets or
    replaces a parameter or a child. Equal values mean no module has changed in between (a
    cheap test before comparing :attr:`Module.weights_version` of one model)."""
    return _clock[0]


def frozen_array(value) -> np.ndarray:
    """A float32 C-contiguous copy of ``value`` in read-only memory that cannot be made
    writeable again (it belongs to an immutable ``bytes`` object).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import frozen_array
    >>> a = frozen_array(np.ones((2, 3)))
    >>> a.dtype, a.shape, a.flags.writeable
    (dtype('float32'), (2, 3), False)
    """
    a = np.ascontiguousarray(value, dtype=np.float32)
    return np.frombuffer(a.tobytes(), dtype=np.float32).reshape(a.shape)


# ----------------------------------------------------------------------------------------------
# the module base


def to_numpy(owner: str, key: str, value) -> np.ndarray:
    """A state-dict entry as a NumPy array (accepts objects with ``__array__``/``detach``), or
    a ModelFormatError naming ``key``.

    Examples
    --------
    >>> from mmcore.model.nn import to_numpy
    >>> to_numpy("layer", "weight", [[1.0, 2.0]]).shape
    (1, 2)
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a framework tensor
        try:
            value = value.detach().cpu().numpy()
        except Exception as exc:
            raise ModelFormatError(f"[{owner}] state dict entry {key!r} cannot be converted to "
                                   f"NumPy: {exc}") from None
    try:
        a = np.asarray(value)
    except Exception as exc:
        raise ModelFormatError(f"[{owner}] state dict entry {key!r} cannot be converted to an "
                               f"array: {exc}") from None
    return a


class Module:
    """Base of the NumPy layers: named float32 parameters, children and state dicts.

    Parameters are registered with :meth:`register_parameter` (``None`` for an absent optional
    one, e.g. a bias switched off, which is then left out of the state dict) and children with
    :meth:`add_module`; both are reachable as attributes. State-dict keys are the dotted paths
    PyTorch uses (``out_proj.weight``), in registration order.

    Parameter arrays are read-only (see the module notes): change weights with
    :meth:`load_state_dict` (all of them) or :meth:`set_parameter` (one, by dotted name).
    :attr:`weights_version` tells whether anything in the module tree was replaced.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import Module, Linear
    >>> class Two(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.add_module("a", Linear(2, 3, rng=0))
    ...         self.add_module("b", Linear(3, 1, bias=False, rng=1))
    >>> list(Two().state_dict())
    ['a.weight', 'a.bias', 'b.weight']
    >>> Two().num_parameters()
    12
    """

    #: Parameters that may stay a :class:`~mmcore.ops.linear.QuantizedTensor` when a state
    #: dict gives them quantized (weights only :func:`mmcore.ops.linear` reads).
    _QUANTIZABLE: Tuple[str, ...] = ()

    #: Entries of ``__dict__`` that are caches derived from the parameters: left out of copies
    #: and pickles (made again on first use) and dropped when a parameter is replaced.
    _TRANSIENT: Tuple[str, ...] = ("_packs",)

    def __init__(self):
        self.__dict__["_params"] = {}
        self.__dict__["_modules"] = {}
        self.__dict__["_stamp"] = _tick()

    def _replaced(self) -> None:
        """Note that a parameter or child of this module was registered or replaced: a new
        stamp, and the caches derived from the parameters dropped."""
        d = self.__dict__
        for name in self._TRANSIENT:
            d.pop(name, None)
        d["_stamp"] = _tick()

    # -- registration ---------------------------------------------------------------------------

    def register_parameter(self, name: str, value: Optional[np.ndarray]) -> None:
        """Register (or replace) parameter ``name``; ``None`` marks an absent optional one.

        The value is copied into read-only float32 memory (a
        :class:`~mmcore.ops.linear.QuantizedTensor` is kept, its arrays marked read-only, when
        ``name`` is one of the module's quantizable weights). Unlike :meth:`set_parameter` the
        shape is not checked: this is for building modules.
        """
        if isinstance(value, QuantizedTensor) and name in self._QUANTIZABLE:
            value = _freeze_quantized(value)
        elif value is not None:
            value = frozen_array(value)
        self._params[name] = value
        self._replaced()

    def add_module(self, name: str, module: "Module") -> None:
        """Register child ``module`` under ``name`` (its keys get the prefix ``name.``)."""
        if not isinstance(module, Module):
            raise TypeError(f"{name} must be a Module, got {type(module).__name__}")
        self._modules[name] = module
        self._replaced()

    def __getstate__(self):
        # the caches derived from the parameters (native packs cannot be pickled) stay behind
        state = dict(self.__dict__)
        for name in self._TRANSIENT:
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        # a copied or unpickled module gets read-only parameters again, its own containers
        # (a shallow copy must not share them: a change through one would bypass the other's
        # version) and a new stamp
        state = {k: v for k, v in state.items() if k not in self._TRANSIENT}
        self.__dict__.update(state)
        params = dict(self.__dict__.get("_params", {}))
        for name, value in params.items():
            if isinstance(value, QuantizedTensor):
                params[name] = _freeze_quantized(value)
            elif value is not None and value.flags.writeable:
                params[name] = frozen_array(value)
        self.__dict__["_params"] = params
        self.__dict__["_modules"] = dict(self.__dict__.get("_modules", {}))
        self._replaced()

    @property
    def weights_version(self) -> int:
        """An int that grows whenever a parameter or a child anywhere in this module's tree is
        registered or replaced (by :meth:`register_parameter`, :meth:`add_module`,
        :meth:`load_state_dict` or :meth:`set_parameter`); equal values mean the same arrays.

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.model import Linear
        >>> lin = Linear(2, 2, rng=0)
        >>> v = lin.weights_version
        >>> _ = lin.set_parameter("bias", np.zeros(2, np.float32))
        >>> lin.weights_version > v
        True
        """
        v = self._stamp
        for child in self._modules.values():
            w = child.weights_version
            if w > v:
                v = w
        return v

    def packed_weight(self, name: str, rows: Optional[Tuple[int, int]] = None
                      ) -> Union[PackedWeight, QuantizedTensor]:
        """Parameter ``name`` (a present 2-D parameter of this module, not a dotted path; its
        rows ``start:stop`` when ``rows`` is given) as the matrix products read it, packed once
        per precision (see :mod:`mmcore.model.packing`): an :class:`mmcore.ops.PackedWeight` of
        a float32 matrix, or the :class:`~mmcore.ops.linear.QuantizedTensor` itself. Kept while
        the parameter stays the same object; registering or replacing any parameter of this
        module drops every kept one. Raises ModelFormatError for an absent parameter.

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.model import Linear
        >>> lin = Linear(4, 6, rng=0)
        >>> pw = lin.packed_weight("weight")
        >>> pw.shape, pw is lin.packed_weight("weight"), lin.packed_weight("weight", (2, 5)).shape
        ((6, 4), True, (3, 4))
        >>> _ = lin.set_parameter("weight", np.zeros((6, 4)))
        >>> lin.packed_weight("weight") is pw, float(np.abs(lin.packed_weight("weight")).max())
        (False, 0.0)
        """
        return _packing.packed_weight(self, name, rows)

    def packed_nbytes(self) -> int:
        """Bytes held by the packed weights of this module tree (:meth:`packed_weight`) beyond
        the parameters: the native packs of float32 matrices and of quantized weights.

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.model import Linear
        >>> lin = Linear(4, 6, rng=0)
        >>> before = lin.packed_nbytes()
        >>> _ = lin(np.ones((1, 4), np.float32))
        >>> before, lin.packed_nbytes() >= lin.weight.nbytes
        (0, True)
        """
        return _packing.packed_nbytes(self)

    def __getattr__(self, name):
        d = self.__dict__
        if name in d.get("_params", ()):
            return d["_params"][name]
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name, value):
        d = self.__dict__
        if name in d.get("_params", ()):
            raise AttributeError(f"set parameter {name!r} through set_parameter or "
                                 "load_state_dict (it is validated there)")
        if name in d.get("_modules", ()):
            raise AttributeError(f"replace child module {name!r} with add_module")
        object.__setattr__(self, name, value)

    # -- traversal ------------------------------------------------------------------------------

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        """``(name, module)`` for every direct child, in registration order.

        Examples
        --------
        >>> from mmcore.model.nn import Module, Linear
        >>> m = Module()
        >>> m.add_module("proj", Linear(2, 2, rng=0))
        >>> [name for name, _ in m.named_children()]
        ['proj']
        """
        return iter(list(self._modules.items()))

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        """``(dotted name, array)`` for every present parameter, in registration order."""
        for name, value in self._params.items():
            if value is not None:
                yield prefix + name, value
        for name, child in self._modules.items():
            yield from child.named_parameters(prefix + name + ".")

    def num_parameters(self) -> int:
        """Total number of scalar weights."""
        return sum(int(v.size) for _, v in self.named_parameters())

    def parameter_nbytes(self) -> int:
        """Bytes the parameters hold in memory (quantized weights count as stored)."""
        return sum(int(v.nbytes) for _, v in self.named_parameters())

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of every parameter, keyed by dotted name (PyTorch key names and layout)."""
        return {k: v.copy() for k, v in self.named_parameters()}

    def _parameter_slots(self, prefix: str = ""):
        """``(dotted name, owner module, local name, current array)`` for present parameters."""
        for name, value in self._params.items():
            if value is not None:
                yield prefix + name, self, name, value
        for name, child in self._modules.items():
            yield from child._parameter_slots(prefix + name + ".")

    def _unexpected_key_message(self, key: str) -> Optional[str]:
        """A specific explanation for an unexpected (local) key, or None for the generic one."""
        return None

    def _explain_unexpected(self, key: str, full: str) -> Optional[str]:
        msg = self._unexpected_key_message(key)
        if msg is not None:
            return msg.replace("{key}", repr(full))
        for name, child in self._modules.items():
            if key.startswith(name + "."):
                return child._explain_unexpected(key[len(name) + 1:], full)
        return None

    def load_state_dict(self: _M, state_dict: Mapping[str, object], *, prefix: str = "",
                        strict: bool = True) -> _M:
        """Replace every parameter with the entry of ``state_dict`` (validated first, all or none).

        Parameters
        ----------
        state_dict : mapping of str to array
            NumPy arrays (or anything ``numpy.asarray`` takes, including CPU tensors) in the
            PyTorch layout. Values are copied and cast to float32.
        prefix : str, default ""
            Only keys starting with ``prefix`` are considered, with the prefix removed
            (e.g. ``"encoder.layers.3."`` to load one layer from a full checkpoint).
        strict : bool, default True
            Reject keys (under ``prefix``) that this module does not have.

        Raises
        ------
        ModelFormatError
            A key is missing, unexpected (strict), not a float array, of the wrong shape, or
            holds NaN/Inf. The message names the key. Nothing is modified in that case.

        Returns
        -------
        self

        Notes
        -----
        The new parameters are read-only copies (a kept
        :class:`~mmcore.ops.linear.QuantizedTensor` is not copied: its arrays are marked
        read-only in place) and :attr:`weights_version` advances.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise ModelFormatError(f"[{owner}] state dict must be a mapping of names to arrays, "
                                   f"got {type(state_dict).__name__}")
        sub = {k[len(prefix):]: v for k, v in state_dict.items()
               if isinstance(k, str) and k.startswith(prefix)}
        self._convert_state(sub, "")
        slots = list(self._parameter_slots())
        known = {name for name, *_ in slots}
        if strict:
            for key in sub:
                if key not in known:
                    special = self._explain_unexpected(key, prefix + key)
                    raise ModelFormatError(special or (
                        f"[{owner}] unexpected key {prefix + key!r} in state dict "
                        f"(expected {sorted(prefix + k for k in known)})"))
        staged = []
        for name, module, local, current in slots:
            full = prefix + name
            if name not in sub:
                raise ModelFormatError(f"[{owner}] state dict is missing key {full!r} "
                                       f"(shape {current.shape})")
            staged.append((module, local,
                           _checked_value(owner, full, sub[name], current, module, local)))
        for module, local, a in staged:
            module._params[local] = a
        for module in {id(m): m for m, _, _ in staged}.values():
            module._replaced()
        self._after_load()
        return self

    def set_parameter(self: _M, name: str, value: Union[ArrayLike, QuantizedTensor]) -> _M:
        """Replace one parameter, by its dotted state-dict name, validated as
        :meth:`load_state_dict` validates an entry.

        Parameters
        ----------
        name : str
            A key of :meth:`state_dict` (``"layers.0.linear1.weight"``).
        value : float array of the parameter's shape, or a
            :class:`~mmcore.ops.linear.QuantizedTensor` for a quantizable weight
            Copied into read-only float32 memory.

        Raises
        ------
        ModelFormatError
            ``name`` is not a present parameter; the value has the wrong shape or dtype, or
            holds NaN/Inf. Nothing is modified in that case.

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> from mmcore.model import Linear
        >>> lin = Linear(3, 2, rng=0)
        >>> _ = lin.set_parameter("weight", np.ones((2, 3))).set_parameter("bias", [0.5, 1.0])
        >>> lin(np.ones((1, 3), np.float32))
        array([[3.5, 4. ]], dtype=float32)
        >>> lin.weight[0, 0] = 2.0
        Traceback (most recent call last):
        ...
        ValueError: assignment destination is read-only
        """
        owner = type(self).__name__
        if not isinstance(name, str):
            raise ModelFormatError(f"[{owner}] parameter name must be a str, got "
                                   f"{type(name).__name__}")
        for full, module, local, current in self._parameter_slots():
            if full == name:
                module._params[local] = _checked_value(owner, name, value, current, module, local)
                module._replaced()
                self._after_load()
                return self
        raise ModelFormatError(f"[{owner}] no parameter {name!r} (parameters: "
                               f"{sorted(k for k, *_ in self._parameter_slots())})")

    def _convert_state(self, state_dict: dict, prefix: str) -> None:
        """Hook: rewrite (a copy of) a state dict into this module's own keys before loading.

        ``prefix`` is this module's dotted path; the default recurses into the children.
        """
        for name, child in self._modules.items():
            child._convert_state(state_dict, prefix + name + ".")

    def _after_load(self) -> None:
        """Hook run after parameters are replaced (children first)."""
        for child in self._modules.values():
            child._after_load()

    # -- display --------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        if not self._modules:
            return f"{type(self).__name__}({extra})"
        lines = [f"{type(self).__name__}("] + ([f"  {extra}"] if extra else [])
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


def _checked_value(owner: str, full: str, value, current, module: Module, local: str):
    """A validated, read-only replacement for parameter ``full`` (current array ``current``)."""
    if isinstance(value, QuantizedTensor) and local in module._QUANTIZABLE:
        if tuple(value.shape) != tuple(current.shape):
            raise ModelFormatError(f"[{owner}] state dict entry {full!r} has shape "
                                   f"{tuple(value.shape)}, expected {tuple(current.shape)}")
        if not np.isfinite(value.dequantize()).all():
            raise ModelFormatError(f"[{owner}] state dict entry {full!r} contains NaN or Inf")
        return _freeze_quantized(value)
    a = to_numpy(owner, full, value)
    if a.dtype not in _FLOAT_DTYPES:
        raise ModelFormatError(f"[{owner}] state dict entry {full!r} has dtype {a.dtype}, "
                               "expected a float dtype")
    if a.shape != current.shape:
        raise ModelFormatError(f"[{owner}] state dict entry {full!r} has shape "
                               f"{tuple(a.shape)}, expected {tuple(current.shape)}")
    a = frozen_array(a)
    if not np.isfinite(a).all():
        raise ModelFormatError(f"[{owner}] state dict entry {full!r} contains NaN or Inf")
    return a


def _missing(owner: str, state_dict: Mapping, key: str) -> ModelFormatError:
    return ModelFormatError(f"[{owner}] state dict is missing key {key!r}")


def state_entry(owner: str, state_dict: Mapping, key: str, ndim: int, dims: str) -> np.ndarray:
    """``state_dict[key]`` as an array of rank ``ndim`` (for inferring sizes), or a
    ModelFormatError (missing key, other rank; ``dims`` names the expected dimensions).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import state_entry
    >>> state_entry("layer", {"w": np.zeros((3, 2))}, "w", 2, "(out, in)").shape
    (3, 2)
    """
    if key not in state_dict:
        raise _missing(owner, state_dict, key)
    a = to_numpy(owner, key, state_dict[key])
    if a.ndim != ndim:
        raise ModelFormatError(f"[{owner}] state dict entry {key!r} has shape {tuple(a.shape)}, "
                               f"expected {ndim} dims {dims}")
    return a


_to_numpy = to_numpy  # the former private names
_state_entry = state_entry


# ----------------------------------------------------------------------------------------------
# Linear and LayerNorm


def linear(x: np.ndarray, weight: Union[np.ndarray, QuantizedTensor, PackedWeight],
           bias: Optional[np.ndarray]) -> np.ndarray:
    """``x @ weight.T + bias`` over the last axis of float32 ``x`` (:func:`mmcore.ops.linear`:
    the library's kernel on its own thread pool, not NumPy's BLAS), under the current matmul
    precision (:func:`mmcore.get_matmul_precision`)."""
    return _ops_linear(x, weight, bias)


class Linear(Module):
    """Affine map ``y = x @ weight.T + bias`` over the last axis, as ``torch.nn.Linear``.

    The product is :func:`mmcore.ops.linear` under the current matmul precision
    (:func:`mmcore.get_matmul_precision`), with the weight packed once per precision
    (:meth:`~Module.packed_weight`); under ``"highest"`` it is exact float32.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    rng : None, int or numpy.random.Generator
        Initialisation as PyTorch's default: weight and bias ``U(-1/sqrt(in), 1/sqrt(in))``.

    Attributes
    ----------
    weight : float32 (out_features, in_features)
    bias : float32 (out_features,) or None

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import Linear
    >>> lin = Linear(8, 2, rng=0)
    >>> lin(np.zeros((3, 8), np.float32)).shape
    (3, 2)
    >>> bool(np.array_equal(lin(np.zeros((1, 8), np.float32))[0], lin.bias))
    True
    >>> import mmcore
    >>> x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    >>> with mmcore.matmul_precision("int8"):
    ...     y8 = lin(x)
    >>> bool(np.abs(y8 - lin(x)).max() < 0.02), bool(np.array_equal(y8, lin(x)))
    (True, False)
    """

    _QUANTIZABLE = ("weight",)

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 rng: RngLike = None):
        super().__init__()
        self.in_features = check_features("Linear", "in_features", in_features)
        self.out_features = check_features("Linear", "out_features", out_features)
        gen = as_generator(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.register_parameter("weight",
                                _uniform(gen, (self.out_features, self.in_features), bound))
        self.register_parameter("bias",
                                _uniform(gen, (self.out_features,), bound) if bias else None)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, *, prefix: str = "",
                        strict: bool = True) -> "Linear":
        """Build from ``{"weight": (out, in)[, "bias": (out,)]}`` (sizes inferred)."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items()
              if isinstance(k, str) and k.startswith(prefix)}
        w = state_entry("Linear", sd, "weight", 2, "(out_features, in_features)")
        mod = cls(int(w.shape[1]), int(w.shape[0]), bias="bias" in sd, rng=NO_INIT)
        return mod.load_state_dict(sd, strict=strict)

    def __call__(self, x: ArrayLike) -> np.ndarray:
        x = as_float_input("Linear", "x", x, last=self.in_features, last_name="in_features")
        return linear(x, self.packed_weight("weight"), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class LayerNorm(Module):
    """Layer normalisation over the last axis, as ``torch.nn.LayerNorm(D)``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, computed in
    float32 (two-pass, pairwise sums).

    Parameters
    ----------
    normalized_shape : int
        Size ``D`` of the last axis (only 1-D normalisation is supported).
    eps : float, default 1e-5
        As PyTorch's default.
    elementwise_affine : bool, default True
        Keep ``weight`` (init 1) and ``bias`` (init 0).
    bias : bool, default True
        Keep ``bias`` (``torch.nn.LayerNorm(bias=False)`` when False).

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import LayerNorm
    >>> y = LayerNorm(4)(np.array([[1., 2., 3., 4.]], np.float32))
    >>> np.round(y, 4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416]], dtype=float32)
    """

    def __init__(self, normalized_shape: int, *, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1:
            normalized_shape = normalized_shape[0]
        self.normalized_shape = check_features("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = check_positive("LayerNorm", "eps", eps)
        self.elementwise_affine = bool(elementwise_affine)
        d = self.normalized_shape
        self.register_parameter("weight", np.ones(d, np.float32) if elementwise_affine else None)
        self.register_parameter("bias", np.zeros(d, np.float32)
                                if (elementwise_affine and bias) else None)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, *, prefix: str = "", eps: float = 1e-5,
                        strict: bool = True) -> "LayerNorm":
        """Build from ``{"weight": (D,)[, "bias": (D,)]}`` (size inferred)."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items()
              if isinstance(k, str) and k.startswith(prefix)}
        w = state_entry("LayerNorm", sd, "weight", 1, "(D,)")
        mod = cls(int(w.shape[0]), eps=eps, bias="bias" in sd)
        return mod.load_state_dict(sd, strict=strict)

    def __call__(self, x: ArrayLike) -> np.ndarray:
        x = as_float_input("LayerNorm", "x", x, last=self.normalized_shape,
                           last_name="normalized_shape")
        return _ops_layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps:g}, "
                f"elementwise_affine={self.elementwise_affine}")


# ----------------------------------------------------------------------------------------------
# activations

_erf_impl: Optional[Callable[[np.ndarray], np.ndarray]] = None

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1 / (1 + p x)
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf_approx(x: np.ndarray) -> np.ndarray:
    """erf without SciPy: Abramowitz & Stegun 7.1.26 in float64, |error| <= 1.5e-7.

    Used by :func:`gelu` only when SciPy is not installed; the resulting GELU differs from the
    exact one by at most 2.2e-7 absolute (measured over [-10, 10]; largest near |x| = 3, where
    it is about one float32 ulp).
    """
    z = np.asarray(x, dtype=np.float64)
    a = np.abs(z)
    t = 1.0 / (1.0 + _AS_P * a)
    a1, a2, a3, a4, a5 = _AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    y = 1.0 - poly * np.exp(-a * a)
    return np.copysign(y, z)


def _erf(x: np.ndarray) -> np.ndarray:
    global _erf_impl
    if _erf_impl is None:
        try:
            from scipy.special import erf as scipy_erf
        except Exception:  # SciPy is optional
            _erf_impl = _erf_approx
        else:
            _erf_impl = scipy_erf
    return _erf_impl(x)


def _act_input(name: str, x) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:
        raise ShapeError(f"[{name}] x cannot be converted to an array: {exc}") from None
    if a.dtype not in _FLOAT_DTYPES:
        raise ShapeError(f"[{name}] x has dtype {a.dtype}, expected float32 (float16 and float64 "
                         "are cast)")
    return a.astype(np.float32, copy=False)


_SQRT_HALF = np.float32(1.0 / math.sqrt(2.0))
_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x: ArrayLike, *, approximate: Literal["none", "tanh"] = "none") -> np.ndarray:
    """Gaussian error linear unit, as ``torch.nn.functional.gelu``.

    Parameters
    ----------
    x : float array
    approximate : {"none", "tanh"}, default "none"
        ``"none"``: the exact ``0.5 x (1 + erf(x / sqrt(2)))`` (PyTorch's default). ``erf`` comes
        from SciPy when it is installed; otherwise from the Abramowitz & Stegun 7.1.26 rational
        approximation, whose GELU is within 2.2e-7 absolute of the exact one (about one float32
        ulp where it is largest).
        ``"tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (``gelu_new`` / GPT-2).

    Returns
    -------
    float32 array of the shape of ``x``

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import gelu
    >>> np.round(gelu(np.array([-1.0, 0.0, 1.0, 3.0], np.float32)), 5)
    array([-0.15866,  0.     ,  0.84134,  2.99595], dtype=float32)
    >>> np.round(gelu(np.array([1.0], np.float32), approximate="tanh"), 5)
    array([0.84119], dtype=float32)
    """
    x = _act_input("gelu", x)
    if approximate == "none":
        e = np.asarray(_erf(x * _SQRT_HALF), dtype=np.float32)
        return np.float32(0.5) * x * (np.float32(1.0) + e)
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    raise ConfigError(f"[gelu] approximate must be 'none' or 'tanh', got {approximate!r}")


def quick_gelu(x: ArrayLike) -> np.ndarray:
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP's activation), overflow-free.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import quick_gelu
    >>> [round(float(v), 4) for v in quick_gelu(np.array([-100.0, 1.0], np.float32))]
    [-0.0, 0.8458]
    """
    x = _act_input("quick_gelu", x)
    # sigmoid(z) = (1 + tanh(z / 2)) / 2 never overflows
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.851) * x)))


def relu(x: ArrayLike) -> np.ndarray:
    """``max(x, 0)`` in float32.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model.nn import relu
    >>> relu(np.array([-1.0, 2.0], np.float32))
    array([0., 2.], dtype=float32)
    """
    x = _act_input("relu", x)
    return np.maximum(x, np.float32(0.0))


def _gelu_tanh(x):
    return gelu(x, approximate="tanh")


ACTIVATIONS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": gelu,
    "gelu_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": relu,
}


def fused_activation(fn: Callable) -> Optional[str]:
    """The name :func:`mmcore.ops.linear` fuses for the activation function ``fn``, or None."""
    for name, known in (("gelu", gelu), ("gelu_tanh", _gelu_tanh), ("quick_gelu", quick_gelu),
                        ("relu", relu)):
        if fn is known:
            return name
    return None


def get_activation(activation: ActivationLike) -> Callable[[np.ndarray], np.ndarray]:
    """An activation by name (see :data:`ACTIVATIONS`, Hugging Face names) or a callable as is.

    Examples
    --------
    >>> from mmcore.model.nn import get_activation, gelu
    >>> get_activation("gelu") is gelu
    True
    """
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ConfigError(f"activation must be a callable or one of {sorted(ACTIVATIONS)}, "
                      f"got {activation!r}")

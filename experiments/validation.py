"""The few parts of pydantic the run config's schema (``experiments.schema``) uses, with pydantic's own semantics and
messages, in plain Python.

Why not pydantic itself: every ``python -m experiments.run`` process validated its config with it, and importing
pydantic and building the schema's twelve models took 90-110 ms of the process (this 2-core VM, 6 December: pydantic
66-73 ms, the models 25-29 ms), a sixth of a simulated 10,000-request run. What the schema needs is small: fields of
type ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``Optional[...]`` and nested nodes, ``gt``/``ge``/
``lt``/``le`` bounds, field checks that see the fields before them, a node check after its fields, and every error of
a config at once, each with its key path -- which is what this module does, as pydantic 2 does it in its default
(lax) mode:

- ``int`` takes an int, a bool, a float without a fraction (not an infinite one), a string (or bytes) of an integer
  (surrounding whitespace, a sign, ``_`` between digits, a ``.0`` fraction allowed: ``" +1_000.0 "``);
- ``float`` takes a float, an int, a bool, a string of a number (Python's ``float`` syntax, ASCII only: ``"inf"``,
  ``"1e3"``, ``" 2.5 "``);
- ``bool`` takes a bool, 0 / 1 (int or whole float), and the strings ``0 off f false n no`` / ``1 on t true y yes``
  in any case;
- ``str`` takes a string (or bytes, decoded);
- bounds are checked after the type, ``le``, ``lt``, ``ge``, ``gt`` in that order, the first failing one reported;
- a field check runs only when its field's type is right (``info.data`` holds the fields before it that are), a
  node check only when all its fields are; a ``ValueError`` in either is reported as ``Value error, <message>``;
- keys the node does not declare are kept (``model_extra``), unchecked; a default is not checked.

The errors are pydantic's dictionaries (``type``, ``loc``, ``msg``, ``input``) with its messages, word for word
(``Input should be greater than 0``, ``Input should be 'poisson', 'gamma', 'constant' or 'trace'``).
``tests/test_validation.py`` builds the pydantic twin of every node of the schema and compares the two on thousands
of inputs; pydantic stays installed (the live scheduler's request bodies, ``block.openai_params``, use it), so the
comparison runs wherever the tests do. Known differences, both for strings no YAML or Hydra override produces:
``float`` refuses ``"1_e3"`` (pydantic reads 1000.0), and non-ASCII digits are refused by both types (as pydantic
does; Python's ``float`` would read them).
"""

from __future__ import annotations

import math
import re
import typing
from typing import Any, Callable, Literal, Optional, Union

_MISSING: Any = object()
_INT_STRING = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_BOUNDS = (("le", "less_than_equal", "less than or equal to", lambda v, b: v <= b),
           ("lt", "less_than", "less than", lambda v, b: v < b),
           ("ge", "greater_than_equal", "greater than or equal to", lambda v, b: v >= b),
           ("gt", "greater_than", "greater than", lambda v, b: v > b))


class FieldInfo:
    """A field's default and bounds (what ``Field(...)`` returns)."""

    __slots__ = ("default", "bounds")

    def __init__(self, default: Any, bounds: dict[str, float]) -> None:
        self.default = default
        self.bounds = bounds


def Field(default: Any = _MISSING, *, gt: Optional[float] = None, ge: Optional[float] = None,  # noqa: N802
          lt: Optional[float] = None, le: Optional[float] = None) -> Any:
    """A field's default (none: the key is required) and bounds, as ``pydantic.Field`` takes them."""
    return FieldInfo(default, {k: v for k, v in (("le", le), ("lt", lt), ("ge", ge), ("gt", gt)) if v is not None})


class ValidationInfo:
    """What a field check sees besides its value: ``data``, the node's fields before it that validated."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


class ValidationError(ValueError):
    """Every error of one validation, as pydantic reports them (``errors()``: dicts of type, loc, msg, input)."""

    def __init__(self, title: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s) for {title}")
        self._errors = errors

    def errors(self, include_url: bool = False) -> list[dict[str, Any]]:  # noqa: ARG002  (pydantic's signature)
        return [dict(e) for e in self._errors]


def field_validator(*names: str) -> Callable[[Any], Any]:
    """Mark a classmethod ``(cls, value[, info]) -> value`` as the check of the fields ``names``."""

    def mark(method: Any) -> Any:
        fn = method.__func__ if isinstance(method, classmethod) else method
        fn.__checks_fields__ = names
        return method

    return mark


def model_validator(*, mode: str) -> Callable[[Any], Any]:
    """Mark a method ``(self) -> self`` as the node's check after its fields (``mode="after"``, the one supported)."""
    if mode != "after":
        raise ValueError(f"model_validator(mode={mode!r}): only mode='after' is supported")

    def mark(fn: Any) -> Any:
        fn.__checks_node__ = True
        return fn

    return mark


class _Bad(Exception):
    """One value's error: its pydantic type, message and context."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


def _number_text(bound: float) -> str:
    """A bound as pydantic's messages print it: 0.0 -> "0", 0.5 -> "0.5"."""
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return str(bound)


def _as_int(v: Any) -> int:
    if isinstance(v, int):  # bool included, as pydantic's lax mode takes it
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Bad("finite_number", "Input should be a finite number")
        if not v.is_integer():
            raise _Bad("int_from_float", "Input should be a valid integer, got a number with a fractional part")
        if abs(v) >= 2.0 ** 63:
            raise _Bad("int_parsing_size", "Unable to parse input string as an integer, exceeded maximum size")
        return int(v)
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        s = v.strip()
        if _INT_STRING.fullmatch(s):
            return int(s.split(".", 1)[0])
        raise _Bad("int_parsing", "Input should be a valid integer, unable to parse string as an integer")
    raise _Bad("int_type", "Input should be a valid integer")


def _as_float(v: Any) -> float:
    if isinstance(v, float):
        return v
    if isinstance(v, int):
        try:
            return float(v)
        except OverflowError:
            raise _Bad("float_type", "Input should be a valid number") from None
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        s = v.strip()
        try:
            if not s.isascii():
                raise ValueError(s)
            return float(s)
        except ValueError:
            raise _Bad("float_parsing", "Input should be a valid number, unable to parse string as a number") from None
    raise _Bad("float_type", "Input should be a valid number")


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 2.0 ** 63:
        v = int(v)  # a whole float is read as the integer it is
    if isinstance(v, int):
        if v in (0, 1):
            return bool(v)
        if -2 ** 63 <= v < 2 ** 63:
            raise _Bad("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    if isinstance(v, (int, float)):
        raise _Bad("bool_type", "Input should be a valid boolean")
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        s = v.lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise _Bad("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    raise _Bad("bool_type", "Input should be a valid boolean")


def _as_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    raise _Bad("string_type", "Input should be a valid string")


_SCALARS: dict[Any, Callable[[Any], Any]] = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}


def _choices_text(choices: tuple[Any, ...]) -> str:
    shown = [repr(c) for c in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


class _Spec:
    """A field resolved from its annotation: a scalar, a literal, a node, each maybe optional."""

    __slots__ = ("optional", "scalar", "choices", "node", "bounds", "default", "checks")

    def __init__(self, tp: Any, info: FieldInfo, checks: list[Callable[..., Any]]) -> None:
        self.optional = False
        if typing.get_origin(tp) is Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1 or len(typing.get_args(tp)) != 2:
                raise TypeError(f"unsupported annotation {tp!r}: only Optional[X] of a union")
            self.optional, tp = True, args[0]
        self.scalar = _SCALARS.get(tp)
        self.choices = tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None
        self.node = tp if isinstance(tp, type) and issubclass(tp, Node) else None
        if self.scalar is None and self.choices is None and self.node is None:
            raise TypeError(f"unsupported annotation {tp!r} (int, float, bool, str, Literal, a Node, Optional)")
        if info.bounds and tp not in (int, float):
            raise TypeError(f"bounds on a {tp!r} field: only int and float fields take gt/ge/lt/le")
        self.bounds = info.bounds
        self.default = info.default
        self.checks = checks

    def value(self, v: Any, loc: tuple, errors: list[dict[str, Any]]) -> tuple[bool, Any]:
        """(True, the validated value) or (False, None) with the error appended to ``errors``."""
        if v is None and self.optional:
            return True, None
        if self.node is not None:
            n0 = len(errors)
            out = self.node._validate(v, loc, errors)
            return len(errors) == n0, out
        try:
            if self.choices is not None:
                if not any(type(v) is type(c) and v == c for c in self.choices):
                    raise _Bad("literal_error", f"Input should be {_choices_text(self.choices)}")
                return True, v
            out = self.scalar(v)
            for key, kind, words, ok in _BOUNDS:
                bound = self.bounds.get(key)
                if bound is not None and not ok(out, bound):
                    raise _Bad(kind, f"Input should be {words} {_number_text(bound)}")
            return True, out
        except _Bad as bad:
            errors.append({"type": bad.kind, "loc": loc, "msg": bad.msg, "input": v})
            return False, None


class Node:
    """A config node: the annotated keys are checked, the others kept as they are (``model_extra``).

    Fields are the class's annotations (``name: type = default`` or ``= Field(default, gt=...)``); names starting
    with ``_`` are private attributes, not fields. They are resolved on the first validation of the class.
    """

    # resolved on a class's first use (``_resolve``, stored in the class's own __dict__): its annotations may name
    # classes defined later in the module
    _specs: Optional[dict[str, _Spec]] = None
    _node_checks: tuple[Callable[..., Any], ...] = ()

    def __init__(self, **data: Any) -> None:
        errors: list[dict[str, Any]] = []
        done = type(self)._fill(self, data, (), errors)
        if errors or not done:
            raise ValidationError(type(self).__name__, errors)

    @classmethod
    def _resolve(cls) -> dict[str, _Spec]:
        if cls.__dict__.get("_specs") is not None:
            return cls._specs  # type: ignore[return-value]
        hints = typing.get_type_hints(cls)
        checks: dict[str, list[Callable[..., Any]]] = {}
        node_checks = []
        methods: dict[str, Any] = {}  # by name, a subclass's method replacing its base's (as pydantic does)
        for klass in reversed(cls.__mro__):
            methods.update(vars(klass))
        for attr in methods.values():
            fn = attr.__func__ if isinstance(attr, classmethod) else attr
            for name in getattr(fn, "__checks_fields__", ()):
                bound = attr.__get__(None, cls) if isinstance(attr, classmethod) else fn
                # (cls, value) or (cls, value, info), as pydantic tells them apart by their signature
                takes_info = fn.__code__.co_argcount - isinstance(attr, classmethod) >= 2
                checks.setdefault(name, []).append(bound if takes_info else _without_info(bound))
            if getattr(fn, "__checks_node__", False):
                node_checks.append(fn)
        specs = {}
        for name, tp in hints.items():
            if name.startswith("_") or typing.get_origin(tp) is typing.ClassVar:
                continue
            default = methods.get(name, _MISSING)  # the class attribute, a subclass's first
            info = default if isinstance(default, FieldInfo) else FieldInfo(default, {})
            specs[name] = _Spec(tp, info, checks.get(name, []))
        unknown = sorted(set(checks) - set(specs))
        if unknown:
            raise TypeError(f"{cls.__name__}: field checks for undeclared fields {unknown}")
        cls._node_checks = tuple(node_checks)
        cls._specs = specs
        return specs

    @classmethod
    def model_validate(cls, data: Any) -> "Node":
        """``data`` (a mapping) checked into a node; a ValidationError lists every error."""
        errors: list[dict[str, Any]] = []
        out = cls._validate(data, (), errors)
        if errors or out is None:
            raise ValidationError(cls.__name__, errors)
        return out

    @classmethod
    def _validate(cls, data: Any, loc: tuple, errors: list[dict[str, Any]]) -> Optional["Node"]:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            errors.append({"type": "model_type", "loc": loc, "input": data,
                           "msg": f"Input should be a valid dictionary or instance of {cls.__name__}"})
            return None
        node = cls.__new__(cls)
        return node if cls._fill(node, data, loc, errors) else None

    @classmethod
    def _fill(cls, node: "Node", data: dict[str, Any], loc: tuple, errors: list[dict[str, Any]]) -> bool:
        """Check ``data`` into ``node``'s attributes; False (errors appended) when anything is wrong."""
        specs = cls._resolve()
        values: dict[str, Any] = {}
        info = ValidationInfo(values)
        n0 = len(errors)
        for name, spec in specs.items():
            if name not in data:
                if spec.default is _MISSING:
                    errors.append({"type": "missing", "loc": (*loc, name), "msg": "Field required", "input": data})
                else:
                    values[name] = spec.default
                continue
            ok, out = spec.value(data[name], (*loc, name), errors)
            for check in spec.checks if ok else ():
                try:
                    out = check(out, info)
                except (ValueError, AssertionError) as err:
                    errors.append(_check_error(err, (*loc, name), data[name]))
                    ok = False
                    break
            if ok:
                values[name] = out
        node.__dict__.update(values)
        node.__dict__["model_extra"] = {k: v for k, v in data.items() if k not in specs}
        if len(errors) > n0:
            return False
        for check in cls._node_checks:
            try:
                check(node)
            except (ValueError, AssertionError) as err:
                errors.append(_check_error(err, loc, data))
                return False
        return True

    def model_dump(self) -> dict[str, Any]:
        """The fields (nodes as dicts), then the extra keys, as pydantic's ``model_dump`` orders them."""
        out = {name: (v.model_dump() if isinstance(v, Node) else v)
               for name in type(self)._resolve() for v in (self.__dict__[name],)}
        out.update(self.__dict__.get("model_extra") or {})
        return out


def _without_info(check: Callable[[Any], Any]) -> Callable[[Any, ValidationInfo], Any]:
    return lambda value, info: check(value)


def _check_error(err: Exception, loc: tuple, value: Any) -> dict[str, Any]:
    if isinstance(err, AssertionError):
        return {"type": "assertion_error", "loc": loc, "msg": f"Assertion failed, {err}", "input": value}
    return {"type": "value_error", "loc": loc, "msg": f"Value error, {err}", "input": value}


__all__ = ["Field", "FieldInfo", "Node", "ValidationError", "ValidationInfo", "field_validator", "model_validator"]

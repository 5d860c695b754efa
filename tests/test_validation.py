"""``experiments.validation`` behaves as pydantic does on the run config's schema: same accepted values, same
errors (type, key path, message), in the same order.

The reference is pydantic itself (installed: the live scheduler uses it): every node of ``experiments.schema`` gets a
pydantic twin built from the node's own declarations -- types, defaults, bounds and the very same check functions --
and both validate the same inputs: every declared field against a corpus of awkward values, then whole configs (the
default one composed by Hydra) with random keys changed, dropped or added.
"""

from __future__ import annotations

import copy
import math
import random
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import schema
from experiments.validation import Field, Node, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[1]

CORPUS: list[Any] = [
    0, 1, -1, 2, 3, 7, 4096, 10 ** 20, True, False,
    0.0, 0.5, 1.0, 1.5, -0.5, 2.0, 1e20, math.inf, -math.inf, math.nan,
    "3", " 3 ", "3.0", "+03.00", "3.5", "-2", "1_000", "1__0", "abc", "", "1e3", "inf", "nan", " 2.5 ", "0x10",
    "yes", "no", "on", "off", "TRUE", "f", " true", "1", "0",
    "poisson", "gamma", "trace", "constant", "v0", "v1", "e2e", "ttft", "sim", "deploy", "reactive", "none", "oracle",
    "sharegpt", "llama2",
    None, [1], {}, {"a": 1}, b"7",
]


def _node_classes() -> list[type[Node]]:
    return [v for v in vars(schema).values() if isinstance(v, type) and issubclass(v, Node) and v is not Node
            and v is not schema._Node]


class _Private(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    _engine_config: Any = pydantic.PrivateAttr(None)


def _twin_type(tp: Any, memo: dict) -> Any:
    if isinstance(tp, type) and issubclass(tp, Node):
        return _twin(tp, memo)
    if typing.get_origin(tp) is Union:
        return Optional[tuple(_twin_type(a, memo) for a in typing.get_args(tp) if a is not type(None))[0]]
    return tp


def _twin(cls: type[Node], memo: dict) -> type[pydantic.BaseModel]:
    """The pydantic model that ``cls`` would be: its fields, defaults, bounds and check functions."""
    if cls in memo:
        return memo[cls]
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, spec in cls._resolve().items():
        default = ... if spec.default is Field().default else spec.default
        if isinstance(default, Node):
            default = _twin(type(default), memo).model_validate(default.model_dump())
        fields[name] = (_twin_type(hints[name], memo), pydantic.Field(default, **spec.bounds))
    validators = {}
    for klass in reversed(cls.__mro__):
        for attr_name, attr in vars(klass).items():
            fn = attr.__func__ if isinstance(attr, classmethod) else attr
            if getattr(fn, "__checks_fields__", None):
                validators[attr_name] = pydantic.field_validator(*fn.__checks_fields__)(classmethod(fn))
            if getattr(fn, "__checks_node__", False):
                validators[attr_name] = pydantic.model_validator(mode="after")(fn)
    memo[cls] = pydantic.create_model(cls.__name__, __base__=_Private, __validators__=validators, **fields)
    return memo[cls]


def _outcome(model: Any, data: Any) -> tuple:
    try:
        out = model.model_validate(data)
    except (ValidationError, pydantic.ValidationError) as err:
        return ("errors", [(e["type"], tuple(e["loc"]), e["msg"]) for e in err.errors(include_url=False)])
    return ("ok", _comparable(out.model_dump()))


def _comparable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, dict):
        return {k: _comparable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_comparable(x) for x in v]
    return (type(v).__name__, v)


@pytest.mark.parametrize("node", _node_classes(), ids=lambda c: c.__name__)
def test_every_field_takes_and_refuses_what_pydantic_does(node):
    """Each scalar field alone (its node's other fields left out, so only that field's outcome is compared)."""
    hints = typing.get_type_hints(node)
    checked = 0
    for name, spec in node._resolve().items():
        if spec.node is not None:
            continue
        ours = type("One", (Node,), {"__annotations__": {name: hints[name]},
                                     name: Field(spec.default, **spec.bounds)})
        theirs = pydantic.create_model("One", __base__=_Private, **{name: (hints[name], pydantic.Field(
            ... if spec.default is Field().default else spec.default, **spec.bounds))})
        for value in CORPUS:
            assert _outcome(ours, {name: value}) == _outcome(theirs, {name: value}), (node.__name__, name, value)
            checked += 1
    assert checked or not any(s.node is None for s in node._resolve().values())


def _default_config() -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}


def test_whole_configs_get_pydantics_verdicts():
    """The default config, then 400 variants: a declared key set to a corpus value, dropped, a node replaced by a
    non-mapping, or an undeclared key added; each compared as a whole (every error, in order)."""
    base = _default_config()
    twin = _twin(schema.RunConfig, {})
    assert _outcome(schema.RunConfig, base) == _outcome(twin, base)
    assert _outcome(schema.RunConfig, base)[0] == "ok"
    rng = random.Random(17)
    nodes = {name: spec for name, spec in schema.RunConfig._resolve().items()}
    kinds = {"ok": 0, "errors": 0}
    for _ in range(400):
        cfg = copy.deepcopy(base)
        for _change in range(rng.choice((1, 1, 2, 3))):
            key = rng.choice(sorted(nodes))
            spec = nodes[key]
            if spec.node is None or not isinstance(cfg.get(key), dict):
                target, fields = cfg, [key]
            else:
                target, fields = cfg[key], sorted(spec.node._resolve())
            field = rng.choice(fields)
            what = rng.random()
            if what < 0.75:
                target[field] = rng.choice(CORPUS)
            elif what < 0.85:
                target.pop(field, None)
            elif what < 0.92 and spec.node is not None:
                cfg[key] = rng.choice([None, 3, "x", [1]])
            else:
                target[f"extra_{rng.randrange(3)}"] = rng.choice(CORPUS)
        ours, theirs = _outcome(schema.RunConfig, cfg), _outcome(twin, cfg)
        assert ours == theirs, cfg
        kinds[ours[0]] += 1
    assert kinds["ok"] > 10 and kinds["errors"] > 100, kinds


def test_a_field_check_sees_the_fields_before_it_and_runs_only_on_a_good_value():
    seen = []

    class Two(Node):
        a: int = Field(gt=0)
        b: float = 1.0

        @field_validator("b")
        @classmethod
        def _b(cls, v: float, info) -> float:
            seen.append(dict(info.data))
            if v > 5:
                raise ValueError("too big")
            return v * 2

    assert Two.model_validate({"a": 2, "b": "1.5"}).b == 3.0 and seen[-1] == {"a": 2}
    with pytest.raises(ValidationError) as err:
        Two.model_validate({"a": 0, "b": 9})
    assert [(e["loc"], e["msg"]) for e in err.value.errors()] == [
        (("a",), "Input should be greater than 0"), (("b",), "Value error, too big")]
    assert seen[-1] == {}  # a failed: b's check saw no a
    n = len(seen)
    with pytest.raises(ValidationError):
        Two.model_validate({"a": 1, "b": "x"})
    assert len(seen) == n  # no check of a value of the wrong type


_CALLS: list[int] = []


class _Inner(Node):  # at module level: annotations are resolved in the module's namespace
    x: int

    @model_validator(mode="after")
    def _x(self) -> "_Inner":
        _CALLS.append(self.x)
        if self.x == 3:
            raise ValueError("x=3 is refused")
        return self


class _Outer(Node):
    inner: _Inner
    tag: Literal["a", "b"] = "a"


def test_a_node_check_runs_after_its_fields_and_only_when_they_are_good():
    calls, Outer = _CALLS, _Outer
    calls.clear()
    assert Outer.model_validate({"inner": {"x": "2", "y": 1}}).inner.model_extra == {"y": 1}
    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"inner": {"x": 3}, "tag": "c"})
    assert [(e["type"], e["loc"], e["msg"]) for e in err.value.errors()] == [
        ("value_error", ("inner",), "Value error, x=3 is refused"),
        ("literal_error", ("tag",), "Input should be 'a' or 'b'")]
    with pytest.raises(ValidationError):
        Outer.model_validate({"inner": {"x": "no"}})
    assert calls == [2, 3]  # not run for the bad x
    assert Outer.model_validate({"inner": {"x": 1}}).model_dump() == {"inner": {"x": 1}, "tag": "a"}


def test_unsupported_declarations_are_refused_when_the_node_is_first_used():
    class Bad(Node):
        x: list

    with pytest.raises(TypeError, match="unsupported annotation"):
        Bad.model_validate({"x": []})

    class BadBound(Node):
        s: str = Field("a", gt=0)

    with pytest.raises(TypeError, match="only int and float"):
        BadBound.model_validate({})


def test_a_run_imports_no_pydantic(tmp_path):
    """What the module is for: a simulated run's process never imports pydantic (90-110 ms of it here)."""
    from subprocess_run import run_python

    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('PYDANTIC', 'pydantic' in sys.modules, flush=True))\n"
            "sys.argv = ['experiments/run.py', *sys.argv[1:]]\n"
            "runpy.run_module('experiments.run', run_name='__main__', alter_sys=True)\n")
    out = run_python("-c", code, f"output_root={tmp_path}", "workload.num_requests=5", "progress=false",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=300).stdout
    assert "PYDANTIC False" in out, out[-2000:]

"""Typed config schemas: the one place a config node's keys, types, ranges and defaults are declared.

Every config node that builds an object (an attack, a defense, an add-on, a model, the trainer, ...) has
a pydantic model next to the class it builds. Hydra composes the YAML; `validate_node` turns a node into
its schema, filling defaults and refusing what is wrong with one message per problem, each naming the
full key (`defense.attack.steps=2.5 must be an integer`) and, for an unknown key, the closest allowed
name (`threat.epsilon is not a known key; did you mean threat.eps?`).

Why pydantic and not Hydra structured configs: a `+key=value` override bypasses OmegaConf's struct
mode (so a misspelt `+threat.epsilon` would run at the defaults), OmegaConf has no ranges or cross-field
rules, and a number written as 8/255 is not a float to OmegaConf. Pydantic gives `extra="forbid"`,
ranges, choices, validators and readable errors, and the schema stays a plain class a plugin can subclass.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

from robust_train.errors import ConfigError

# ----------------------------------------------------------------------------- numbers


def parse_number(text: str) -> float:
    """A plain number or a fraction of two numbers ("8/255", "0.5/255"); ValueError otherwise."""
    text = text.strip()
    if "/" in text:
        num, _, den = text.partition("/")
        return float(num) / float(den)  # ZeroDivisionError for "x/0"
    return float(text)


def to_float(value: Any, key: str) -> float:
    """Parse 0.03, 8/255, "8/255" or "0.5/255"; raise ConfigError naming `key` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a number; write e.g. 0.03 or 8/255")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_number(value)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}={value!r} is not a number; write e.g. 0.03 or 8/255")


# A step written relative to the attack's radius: "eps", "eps/4", "0.25*eps", "eps*0.25", "2*eps/5".
_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_RELATIVE_STEP = re.compile(
    rf"^(?:(?P<a>{_NUM})\s*\*\s*)?eps(?:\s*\*\s*(?P<b>{_NUM}))?(?:\s*/\s*(?P<c>{_NUM}))?$"
)
STEP_HELP = "write an absolute size (0.01, 2/255) or one relative to eps (eps/4, 0.25*eps)"


def relative_step_factor(value: Any) -> float | None:
    """The factor k of a step written as k*eps ("eps/4" -> 0.25); None for an absolute step."""
    if not isinstance(value, str):
        return None
    m = _RELATIVE_STEP.match(value.strip())
    if m is None:
        return None
    den = float(m["c"] or 1.0)
    if den == 0:
        return None
    return float(m["a"] or 1.0) * float(m["b"] or 1.0) / den


def resolve_step(value: Any, eps: float, key: str) -> float:
    """A step size in pixel units: relative steps ("eps/4") scale with this attack's eps.

    Steps follow the radius unless written as absolute numbers, so `threat.eps=4/255` alone also halves
    the default step (eps/4) instead of keeping a step sized for another radius.
    """
    factor = relative_step_factor(value)
    if factor is not None:
        return factor * float(eps)
    if isinstance(value, str) and "eps" in value:
        raise ConfigError(f"{key}={value!r} is not a step; {STEP_HELP}")
    try:
        return to_float(value, key)
    except ConfigError:
        raise ConfigError(f"{key}={value!r} is not a step; {STEP_HELP}") from None


def _number(value: Any) -> Any:
    """Pydantic pre-validator: fractions become floats; anything else goes on to the float check."""
    if isinstance(value, bool):
        raise ValueError("is not a number; write e.g. 0.03 or 8/255")
    if isinstance(value, str):
        try:
            return parse_number(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError("is not a number; write e.g. 0.03 or 8/255") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be finite")
    return value


def _step(value: Any) -> Any:
    """Pydantic pre-validator of a step: a relative string stays a string, anything else a number."""
    if isinstance(value, str) and relative_step_factor(value) is not None:
        factor = relative_step_factor(value)
        if not factor or factor <= 0:
            raise ValueError(f"must be positive; {STEP_HELP}")
        return value.strip()
    if isinstance(value, str) and "eps" in value:
        raise ValueError(f"is not a step; {STEP_HELP}")
    value = _number(value)
    if isinstance(value, int | float) and not value > 0:
        raise ValueError("is out of range: allowed 0 < value")
    return value


def _integer(value: Any) -> Any:
    """Pydantic pre-validator: booleans and strings are not integers (pydantic's lax mode takes True
    as 1 and "8" as 8; a config writes integers unquoted)."""
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, str):
        try:
            parse_number(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError("is not a number; write e.g. 0.03 or 8/255") from None
        raise ValueError("must be an integer")
    return value


def _flag(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


# An integer (2.0 is taken as 2; 2.5 and true are refused).
Integer = Annotated[int, BeforeValidator(_integer)]
# A boolean written as true/false (not 1, "yes").
Flag = Annotated[bool, BeforeValidator(_flag)]
# A float that may be written as a fraction (8/255, "0.5/255").
Number = Annotated[float, BeforeValidator(_number)]
# A step: a relative expression ("eps/4", kept as written) or an absolute Number.
Step = Annotated[float | str, BeforeValidator(_step)]

# The ranges most fields need, named once.
NonNegativeInt = Annotated[Integer, Field(ge=0)]
PositiveInt = Annotated[Integer, Field(ge=1)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
PositiveNumber = Annotated[Number, Field(gt=0)]
UnitNumber = Annotated[Number, Field(ge=0, le=1)]


# ----------------------------------------------------------------------------- schemas


class Schema(BaseModel):
    """Base of every config schema: unknown keys are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    def get(self, key: str, default: Any = None) -> Any:
        """Mapping-style read, so code written for config dicts reads schemas alike."""
        value = getattr(self, key, default)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in type(self).model_fields

    def keys(self) -> Iterable[str]:
        return type(self).model_fields.keys()

    def items(self) -> Iterable[tuple[str, Any]]:
        return ((k, getattr(self, k)) for k in type(self).model_fields)

    def check(self, path: str) -> list[str]:
        """Cross-field rules, one problem line per violation, each naming its full key under `path`.

        Field types and ranges are pydantic's; a rule that relates fields (or needs the key in its
        message) overrides this and extends `super().check(path)`, which checks the nested schemas.
        """
        problems: list[str] = []
        for key in type(self).model_fields:
            problems += _check_nested(getattr(self, key), f"{path}.{key}" if path else key)
        return problems


def _check_nested(value: Any, path: str) -> list[str]:
    if isinstance(value, Schema):
        return value.check(path)
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _check_nested(v, f"{path}.{k}")]
    return []


class ThreatConfig(Schema):
    """The run's threat model (`threat`, and each dataset's default under `dataset.threat`).

    It lives here, below every part, because datasets carry a default threat model and attacks use it;
    `robust_train.attacks.threat` (ThreatModel, the object it builds) re-exports it.

    `step` is the step size of the attacks that inherit it (training attack, validation PGD, suite
    attacks written `step: ${threat.step}`); relative steps ("eps/4") follow eps.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: NonNegativeNumber = Field(default="8/255", validate_default=True)
    step: Step = "eps/4"

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        # An L-inf radius above 1 covers the whole [0,1] box; L2 radii legitimately exceed 1 on large images.
        if self.norm == "linf" and self.eps > 1.0:
            problems.append(f"{path}.eps={self.eps!r} is out of range: allowed 0 <= value <= 1")
        else:
            problems += step_above_eps(self.step, self.norm, self.eps, f"{path}.step")
        return problems


def step_above_eps(step: Any, norm: str | None, eps: float | None, key: str) -> list[str]:
    """An absolute L-inf step larger than eps, refused (an empty list otherwise).

    An L-inf PGD step above the radius jumps to the ball's corners every iteration, which is almost
    always a step written for another eps. Relative steps larger than eps (FGSM-RS's 1.25*eps) are an
    explicit choice, and L2 steps are not bounded.
    """
    if norm != "linf" or eps is None or step is None or relative_step_factor(step) is not None:
        return []
    if not isinstance(step, int | float) or float(step) <= eps * (1 + 1e-9):
        return []
    return [
        f"{key}={step!r} ({float(step):.6g}) is larger than eps={eps:.6g}: an L-inf PGD step above the "
        f"radius only jumps between the ball's corners; set {key}=eps/4 or a value <= eps"
    ]


S = TypeVar("S", bound=BaseModel)


def did_you_mean(key: str, allowed: Iterable[str], prefix: str = "") -> str:
    """`; did you mean `<prefix><x>`?` for the allowed name closest to `key`, or '' when none is close."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f"; did you mean `{prefix}{close[0]}`?" if close else ""


def plain(node: Any) -> Any:
    """Config containers (DictConfig, ListConfig, schemas) -> plain dicts and lists, resolved."""
    if isinstance(node, BaseModel):
        return node.model_dump()
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(node, Mapping):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [plain(v) for v in node]
    return node


def _dotted(path: str, loc: tuple[Any, ...]) -> str:
    parts = [path] if path else []
    parts += [str(p) for p in loc]
    return ".".join(parts)


def _lookup(node: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def error_lines(err: ValidationError, path: str, schema: type[BaseModel], node: Any) -> list[str]:
    """One readable line per pydantic error, in the project's wording (tests rely on these phrases)."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        full = _dotted(path, loc)
        value = e.get("input")
        kind = e["type"]
        ctx = e.get("ctx") or {}
        if kind == "extra_forbidden":
            parent = _lookup_schema(schema, loc[:-1])
            allowed = list(parent.model_fields) if parent is not None else []
            prefix = _dotted(path, loc[:-1])
            hint = did_you_mean(str(loc[-1]), allowed, f"{prefix}." if prefix else "")
            lines.append(f"{full} is not a known key{hint or '; allowed: ' + ', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"{full} is missing")
        elif kind == "literal_error":
            expected = str(ctx.get("expected", "")).replace("'", "")
            lines.append(f"{full}={value!r} is not allowed; choose one of: {expected.replace(' or ', ', ')}")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            rng = _field_range(schema, loc) or _range(ctx, kind)
            lines.append(f"{full}={value!r} is out of range: allowed {rng}")
        elif kind in ("int_from_float", "int_parsing_size") or (kind == "int_parsing" and _is_number(value)):
            lines.append(f"{full}={value!r} must be an integer")
        elif kind in ("int_parsing", "float_parsing", "float_type", "int_type"):
            lines.append(f"{full}={value!r} is not a number; write e.g. 0.03 or 8/255")
        elif kind in ("bool_parsing", "bool_type"):
            lines.append(f"{full}={value!r} must be true or false")
        elif kind in ("list_type", "tuple_type"):
            lines.append(f"{full}={value!r} must be a list")
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            lines.append(f"{full}={value!r} must be a mapping of keys to values")
        elif kind in ("string_type",):
            lines.append(f"{full}={value!r} must be a string")
        elif kind in ("too_short", "too_long"):
            lines.append(f"{full}={value!r} must have {_length(ctx, kind)} items")
        elif kind == "value_error":
            msg = str(ctx.get("error") or e["msg"]).removeprefix("Value error, ")
            if msg.startswith(full) or "=" in msg.split(" ")[0]:
                lines.append(msg)  # a message that names its key itself
            else:  # ": reason" reads "key=value: reason", anything else "key=value reason"
                lines.append(f"{full}={value!r}{'' if msg.startswith((':', ';')) else ' '}{msg}")
        else:
            lines.append(f"{full}={value!r}: {e['msg']}")
    return lines


def _length(ctx: Mapping[str, Any], kind: str) -> str:
    bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
    return f"at least {bound}" if kind == "too_short" else f"at most {bound}"


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _range(ctx: Mapping[str, Any], kind: str) -> str:
    bound = next(iter(ctx.values()), "?")
    return {
        "greater_than_equal": f"{bound} <= value",
        "greater_than": f"{bound} < value",
        "less_than_equal": f"value <= {bound}",
        "less_than": f"value < {bound}",
    }[kind]


def _field_range(schema: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """Both bounds of the field at `loc` ("0 <= value <= 1"), from its annotations; None if not found."""
    names = [i for i, p in enumerate(loc) if isinstance(p, str)]
    if not names:
        return None
    last = names[-1]
    parent = _lookup_schema(schema, loc[:last])
    field = parent.model_fields.get(str(loc[last])) if parent is not None else None
    if field is None:
        return None
    bounds: dict[str, Any] = {}
    for item in [*field.metadata, *_annotation_metadata(field.annotation)]:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(item, attr, None) is not None and attr not in bounds:
                bounds[attr] = getattr(item, attr)
    if not bounds:
        return None
    left = f"{bounds['ge']:g} <= " if "ge" in bounds else f"{bounds['gt']:g} < " if "gt" in bounds else ""
    right = f" <= {bounds['le']:g}" if "le" in bounds else f" < {bounds['lt']:g}" if "lt" in bounds else ""
    return f"{left}value{right}"


def _annotation_metadata(annotation: Any) -> list[Any]:
    """Constraint objects inside an annotation (Annotated metadata, FieldInfo.metadata, union members)."""
    found: list[Any] = []
    for item in getattr(annotation, "__metadata__", ()) or ():
        found += [item, *getattr(item, "metadata", [])]
    for arg in get_args(annotation):
        if arg is not annotation and not isinstance(arg, str | int | float):
            found += _annotation_metadata(arg)
    return found


def _lookup_schema(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class of the node at `loc` under `schema` (for the allowed names of a nested node)."""
    current: Any = schema
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


MISSING = "???"  # Hydra's mark of a value that must be set (a schema field without a default)


def _drop_missing(data: Any) -> Any:
    """Keys whose value is Hydra's `???` removed, so that pydantic reports them as missing."""
    if isinstance(data, Mapping):
        return {k: _drop_missing(v) for k, v in data.items() if not (isinstance(v, str) and v == MISSING)}
    return data


def check_node(schema: type[S], node: Any, path: str) -> tuple[S | None, list[str]]:
    """`node` validated into `schema` (defaults filled), or None with the problems found.

    A node that already is a `schema` instance is taken as validated. After the field checks pass, the
    schema's cross-field rules (`Schema.check`) run.
    """
    if isinstance(node, schema):
        model = node
    else:
        data = plain(node)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            return None, [f"{path}={data!r} must be a mapping of keys to values"]
        try:
            model = schema.model_validate(_drop_missing(data))
        except ValidationError as err:
            return None, error_lines(err, path, schema, data)
    problems = model.check(path) if isinstance(model, Schema) else []
    return (None, problems) if problems else (model, [])


def raise_problems(problems: list[str]) -> None:
    """One ConfigError listing every problem (one line for a single problem); nothing when empty."""
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "invalid configuration:\n  - " + "\n  - ".join(problems)
        )


def defaults_node(schema: type[BaseModel], name: str | None = None) -> dict[str, Any]:
    """The schema's defaults as a plain config node (`???` where a field has none).

    This is what Hydra composes a group's YAML over (`registry.store_schema_defaults`), so that a
    `key=value` override finds every key while its default is written only in the schema. A field
    named `name` gets the registered `name`.
    """
    node: dict[str, Any] = {}
    for key, field in schema.model_fields.items():
        if key == "name" and name is not None:
            node[key] = name
            continue
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            sub = _model_in(field.annotation)
            node[key] = defaults_node(sub) if sub is not None and _all_defaulted(sub) else MISSING
        elif isinstance(default, BaseModel) and _all_defaulted(type(default)) and default == type(default)():
            node[key] = defaults_node(type(default))  # as written in the schema ("8/255", not 0.0313...)
        else:
            node[key] = plain(default)
    return node


def _all_defaulted(schema: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in schema.model_fields.values())


def validate_node(schema: type[S], node: Any, path: str) -> S:
    """`node` validated into `schema`; ConfigError listing every problem otherwise."""
    model, problems = check_node(schema, node, path)
    raise_problems(problems)
    assert model is not None
    return model

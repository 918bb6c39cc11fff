"""Rule files (YAML) → a validated RuleSet, checked against the device thing models at load time.

A rule on a field the device type does not have, a numeric test on a boolean, an unknown event or
attribute, an override of an unknown rule: `RuleLoadError` naming the file, the rule and the line.
See rules/README.md for the format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from devices import THING_MODELS, ThingModel
from devices.model import Field as DeviceField
from rules.correlation import CorrelationParams
from rules.engine import FlapPolicy, Rule, RuleSet, Variant
from rules.kinds import KINDS, AnyParams, RuleParams
from rules.model import AttrGroup
from rules.state_duration import StateDurationParams

DEFAULT_RULES_DIR = Path(__file__).parent / "default"
#: the registry's lifecycles (gateway.registry.Lifecycle; a test keeps the two equal)
LIFECYCLES = ("registered", "online", "in_service", "disabled", "retired")
#: keys of a rule entry that are about the rule, not its kind's parameters
META_KEYS = frozenset(
    {"title_zh", "title_en", "urgency", "description", "where", "lifecycles", "silent", "enabled", "flapping"}
)
OVERRIDE_META = frozenset({"urgency", "enabled"})
FILE_KEYS = frozenset({"device_type", "defaults", "rules", "overrides"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_PARAMS: TypeAdapter[AnyParams] = TypeAdapter(RuleParams)

try:  # the C loader is several times faster; both keep line marks
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


class RuleLoadError(ValueError):
    """A rule file that cannot be used: names the file, the rule (if any) and the line (if known)."""

    def __init__(self, file: str, rule: str | None, line: int | None, message: str) -> None:
        self.file, self.rule, self.line, self.detail = file, rule, line, message
        where = file + (f":{line}" if line else "")
        super().__init__(f"{where}: " + (f"rule {rule}: " if rule else "") + message)


class _Doc:
    """One parsed file: its data and its node tree (for line numbers)."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleLoadError(self.file, None, None, f"cannot read: {exc}") from None
        loader = _Loader(text)
        try:
            self.node = loader.get_single_node()
            self.data = loader.construct_document(self.node) if self.node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise RuleLoadError(self.file, None, line, f"not valid YAML: {exc}") from None
        finally:
            loader.dispose()

    def line(self, *path: Any) -> int | None:
        """Line of the value at `path` (mapping keys / sequence indexes), or of its nearest parent."""
        node = self.node
        best = node.start_mark.line + 1 if node is not None else None
        for key in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == key or (isinstance(key, int | float) and k.value == str(key)):
                        best = k.start_mark.line + 1
                        node = v
                        break
                else:
                    return best
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                best = node.start_mark.line + 1
            else:
                return best
        return best


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """The YAML files named (a directory stands for its *.yaml / *.yml files, in name order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml"))
        else:
            out.append(p)
    return out


def load_default_rules() -> RuleSet:
    return load_rules([DEFAULT_RULES_DIR])


def load_rules(paths: Iterable[str | Path], models: Mapping[str, ThingModel] | None = None) -> RuleSet:
    """Read, validate and combine rule files. Later files may add rules and override earlier ones'."""
    models = THING_MODELS if models is None else models
    rules: dict[str, tuple[dict[str, Any], _Doc, str]] = {}  # id -> (entry, doc, short name)
    overrides: list[tuple[str, str, str, dict[str, Any], _Doc, tuple[Any, ...]]] = []
    files = rule_files(paths)
    for file in files:
        doc = _Doc(file)
        _read_file(doc, models, rules, overrides)
    built: dict[str, Rule] = {}
    for rid, (entry, doc, name) in rules.items():
        built[rid] = _build_rule(rid, entry, doc, name, models)
    per_rule: dict[str, tuple[dict[str, Variant], dict[str, Variant]]] = {}
    for scope, target, rid, patch, doc, path in overrides:
        if rid not in built:
            raise RuleLoadError(doc.file, rid, doc.line(*path), "override of an unknown rule")
        base_entry = rules[rid][0]
        variant = _build_variant(built[rid], base_entry, patch, doc, path, models)
        comm, dev = per_rule.setdefault(rid, ({}, {}))
        (comm if scope == "community" else dev)[target] = variant
    out = []
    for rid, rule in built.items():
        comm, dev = per_rule.get(rid, ({}, {}))
        if comm or dev:
            rule = rule.model_copy(update={"community_overrides": comm, "device_overrides": dev})
        out.append(rule)
    out = _check_correlations(out, rules)
    return RuleSet(tuple(out), tuple(str(f) for f in files))


def _read_file(
    doc: _Doc,
    models: Mapping[str, ThingModel],
    rules: dict[str, tuple[dict[str, Any], _Doc, str]],
    overrides: list[tuple[str, str, str, dict[str, Any], _Doc, tuple[Any, ...]]],
) -> None:
    data = doc.data
    if data is None:
        return
    if not isinstance(data, dict):
        raise RuleLoadError(doc.file, None, doc.line(), "a rule file is a mapping (device_type, rules, ...)")
    unknown = set(data) - FILE_KEYS
    if unknown:
        k = sorted(map(str, unknown))[0]
        raise RuleLoadError(
            doc.file, None, doc.line(k), f"unknown key {k!r} (known: {', '.join(sorted(FILE_KEYS))})"
        )
    dtype = data.get("device_type")
    if dtype is not None and dtype not in models:
        raise RuleLoadError(
            doc.file,
            None,
            doc.line("device_type"),
            f"unknown device type {dtype!r} (known: {', '.join(models)})",
        )
    entries = data.get("rules") or {}
    if entries and dtype is None:
        raise RuleLoadError(doc.file, None, doc.line("rules"), "a file with rules names its device_type")
    if not isinstance(entries, dict):
        raise RuleLoadError(doc.file, None, doc.line("rules"), "rules is a mapping of rule name to rule")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RuleLoadError(doc.file, None, doc.line("defaults"), "defaults is a mapping")
    for name, entry in entries.items():
        rid = f"{dtype}.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RuleLoadError(doc.file, str(name), doc.line("rules", name), "a rule name is snake_case")
        if not isinstance(entry, dict):
            raise RuleLoadError(doc.file, rid, doc.line("rules", name), "a rule is a mapping")
        if rid in rules:
            other = rules[rid][1]
            raise RuleLoadError(
                doc.file, rid, doc.line("rules", name), f"defined twice (also in {other.file})"
            )
        merged = {**defaults, **entry}
        rules[rid] = (merged, doc, name)
    ov = data.get("overrides") or {}
    if not isinstance(ov, dict) or set(ov) - {"community", "device"}:
        raise RuleLoadError(
            doc.file, None, doc.line("overrides"), "overrides has `community:` and/or `device:`"
        )
    for scope in ("community", "device"):
        targets = ov.get(scope) or {}
        if not isinstance(targets, dict):
            raise RuleLoadError(
                doc.file, None, doc.line("overrides", scope), f"overrides.{scope} is a mapping"
            )
        for target, per_rule in targets.items():
            if not isinstance(per_rule, dict):
                raise RuleLoadError(
                    doc.file,
                    None,
                    doc.line("overrides", scope, target),
                    "an override maps rule names to changes",
                )
            for ref, patch in per_rule.items():
                path = ("overrides", scope, target, ref)
                rid = str(ref) if "." in str(ref) or dtype is None else f"{dtype}.{ref}"
                if not isinstance(patch, dict):
                    raise RuleLoadError(doc.file, rid, doc.line(*path), "an override is a mapping of changes")
                overrides.append((scope, str(target), rid, patch, doc, path))


def _split(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = {k: v for k, v in entry.items() if k in META_KEYS}
    params = {k: v for k, v in entry.items() if k not in META_KEYS}
    return meta, params


def _validation_error(
    doc: _Doc, rid: str, base: tuple[Any, ...], exc: ValidationError, kind: Any
) -> RuleLoadError:
    err = exc.errors()[0]
    loc = [x for x in err["loc"]]
    if loc and loc[0] == kind:
        loc = loc[1:]
    key = loc[0] if loc else None
    where = ".".join(str(x) for x in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown parameter {where!r} for kind {kind!r}"
    elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        msg = f"unknown or missing kind {kind!r} (known: {', '.join(KINDS)})"
        key = "kind"
    elif where:
        msg = f"{where}: {msg}"
    return RuleLoadError(doc.file, rid, doc.line(*base, *([key] if key is not None else [])), msg)


def _build_rule(
    rid: str, entry: dict[str, Any], doc: _Doc, name: str, models: Mapping[str, ThingModel]
) -> Rule:
    dtype = rid.split(".", 1)[0]
    model = models[dtype]
    base = ("rules", name)
    meta, raw = _split(entry)
    for k in ("title_zh", "title_en", "urgency"):
        if k not in meta:
            raise RuleLoadError(doc.file, rid, doc.line(*base), f"missing {k}")
    try:
        params = _PARAMS.validate_python(raw)
    except ValidationError as exc:
        raise _validation_error(doc, rid, base, exc, raw.get("kind")) from None
    params = _complete(params, model)
    where = meta.get("where") or {}
    if not isinstance(where, dict):
        raise RuleLoadError(
            doc.file, rid, doc.line(*base, "where"), "where maps attributes to allowed values"
        )
    where = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in where.items()}
    fields: dict[str, Any] = {
        "id": rid,
        "device_type": dtype,
        "params": params,
        "where": where,
        "source": f"{doc.file}:{doc.line(*base)}",
        **{k: v for k, v in meta.items() if k != "where"},
    }
    if "flapping" in meta and meta["flapping"] is not None:
        try:
            fields["flapping"] = FlapPolicy.model_validate(meta["flapping"])
        except ValidationError as exc:
            raise _validation_error(doc, rid, (*base, "flapping"), exc, None) from None
    try:
        rule = Rule.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(doc, rid, base, exc, None) from None
    _check_against_model(rule.params, rule, model, doc, base)
    return rule


def _complete(params: AnyParams, model: ThingModel) -> AnyParams:
    """Fill parameters that default from the thing model (the absence kind's report interval)."""
    if params.kind == "absence" and params.interval_s is None:
        return params.model_copy(update={"interval_s": float(model.report_interval_s)})
    return params


def _build_variant(
    rule: Rule,
    base_entry: dict[str, Any],
    patch: dict[str, Any],
    doc: _Doc,
    path: tuple[Any, ...],
    models: Mapping[str, ThingModel],
) -> Variant:
    bad = [k for k in patch if k in META_KEYS - OVERRIDE_META or k == "kind"]
    if bad:
        raise RuleLoadError(doc.file, rule.id, doc.line(*path, bad[0]), f"{bad[0]!r} cannot be overridden")
    _, raw = _split(base_entry)
    raw = {**raw, **{k: v for k, v in patch.items() if k not in OVERRIDE_META}}
    try:
        params = _PARAMS.validate_python(raw)
    except ValidationError as exc:
        raise _validation_error(doc, rule.id, path, exc, raw.get("kind")) from None
    model = models[rule.device_type]
    params = _complete(params, model)
    _check_against_model(params, rule, model, doc, path)
    try:
        return Variant(
            params=params,
            urgency=patch.get("urgency", rule.urgency),
            enabled=patch.get("enabled", rule.enabled),
        )
    except ValidationError as exc:
        raise _validation_error(doc, rule.id, path, exc, None) from None


def _check_against_model(
    p: AnyParams, rule: Rule, model: ThingModel, doc: _Doc, base: tuple[Any, ...]
) -> None:
    """Fields, events and attributes the rule reads exist in the thing model, with the right kinds."""
    rid = rule.id

    def fail(key: str, msg: str) -> RuleLoadError:
        return RuleLoadError(doc.file, rid, doc.line(*base, key), msg)

    for name, need in p.reads_fields().items():
        f = model.fields_by_name.get(name)
        key = _param_key(p, name)
        if f is None:
            raise fail(
                key,
                f"{model.type} has no telemetry field {name!r} (fields: {', '.join(model.fields_by_name)})",
            )
        if need == "number" and f.kind not in (float, int):
            raise fail(key, f"numeric test on {f.type_name} field {name!r}")
        if need == "bool" and f.kind is not bool:
            raise fail(key, f"{name!r} is a {f.type_name} field, a boolean is needed here")
        if need == "state":
            if f.kind is bool or (f.kind is str and f.choices):
                _check_equals(p, f, fail)
            else:
                raise fail(key, f"a state needs a boolean or enumerated field; {name!r} is a {f.type_name}")
    for ev in p.reads_events():
        if ev not in model.events_by_name:
            known = ", ".join(model.events_by_name) or "none"
            raise fail(_event_key(p, ev), f"{model.type} has no event {ev!r} (events: {known})")
    attrs = {a.name: a for a in model.attributes}
    for name in sorted(p.reads_attrs()):
        a = attrs.get(name)
        if a is None:
            raise fail(
                _attr_key(p, name),
                f"{model.type} has no attribute {name!r} (attributes: {', '.join(attrs) or 'none'})",
            )
        if a.kind not in (float, int):
            raise fail(_attr_key(p, name), f"attribute {name!r} is a {a.type_name}, a number is needed")
    text_attrs: set[str] = getattr(p, "reads_text_attrs", lambda: set())()
    for name in sorted(text_attrs):
        a = attrs.get(name)
        if a is None or a.kind is not str:
            raise fail("schedule_attr", f"{model.type} has no text attribute {name!r}")
    group_by = getattr(p, "group_by", None)
    if isinstance(group_by, AttrGroup) and group_by.attr not in attrs:
        raise fail("group_by", f"{model.type} has no attribute {group_by.attr!r} to group by")
    for name, allowed in rule.where.items():
        a = attrs.get(name)
        if a is None:
            raise RuleLoadError(
                doc.file, rid, doc.line(*base, "where"), f"where: {model.type} has no attribute {name!r}"
            )
        for v in allowed:
            try:
                a.coerce(v)
            except ValueError as exc:
                raise RuleLoadError(doc.file, rid, doc.line(*base, "where"), f"where: {exc}") from None
    if rule.lifecycles is not None:
        bad = [x for x in rule.lifecycles if x not in LIFECYCLES]
        if bad:
            raise fail("lifecycles", f"unknown lifecycle {bad[0]!r} (known: {', '.join(LIFECYCLES)})")


def _check_equals(p: AnyParams, f: DeviceField, fail: Any) -> None:
    if not isinstance(p, StateDurationParams):
        return
    for v in p.equals:
        if f.kind is bool and not isinstance(v, bool):
            raise fail("equals", f"{f.name!r} is boolean; equals must be true or false (got {v!r})")
        if f.kind is str and (isinstance(v, bool) or v not in f.choices):
            raise fail("equals", f"{f.name!r} is one of {', '.join(f.choices)} (got {v!r})")


def _param_key(p: AnyParams, field_name: str) -> str:
    for k, v in p.model_dump().items():
        if v == field_name and k.endswith("field"):
            return k
    return "field"


def _event_key(p: AnyParams, ev: str) -> str:
    for k, v in p.model_dump().items():
        if isinstance(v, list | tuple) and ev in v:
            return k
    return "events"


def _attr_key(p: AnyParams, attr: str) -> str:
    for k, v in p.model_dump().items():
        if isinstance(v, dict) and v.get("attr") == attr:
            return k
        if isinstance(v, list | tuple) and any(isinstance(x, dict) and attr in str(x) for x in v):
            return k
    return "kind"


def _check_correlations(
    rules: Sequence[Rule], entries: Mapping[str, tuple[dict[str, Any], _Doc, str]]
) -> list[Rule]:
    """Correlation sources exist and are not correlations; short source names become full ids."""
    by_id = {r.id: r for r in rules}
    out = []
    for r in rules:
        if not isinstance(r.params, CorrelationParams):
            out.append(r)
            continue
        _, doc, name = entries[r.id]
        line = doc.line("rules", name, "rules")
        full = tuple(s if "." in s else f"{r.device_type}.{s}" for s in r.params.rules)
        for s in full:
            src = by_id.get(s)
            if src is None:
                raise RuleLoadError(doc.file, r.id, line, f"unknown source rule {s!r}")
            if isinstance(src.params, CorrelationParams):
                raise RuleLoadError(doc.file, r.id, line, f"source {s!r} is itself a correlation")
        update: dict[str, Any] = {"params": r.params.model_copy(update={"rules": full})}
        for attr in ("community_overrides", "device_overrides"):
            update[attr] = {
                k: v.model_copy(update={"params": v.params.model_copy(update={"rules": full})})
                for k, v in getattr(r, attr).items()
            }
        out.append(r.model_copy(update=update))
    return out


def describe(rule: Rule) -> str:
    """One line: the rule's condition in words (docs, the default rules table)."""
    return KINDS[rule.params.kind].describe(rule.params)

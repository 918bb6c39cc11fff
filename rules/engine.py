"""The rules engine: validated rule sets, per-(rule, key) state, and the alarm bookkeeping every rule kind
shares (one open alarm per key, escalation, repeats, flapping damping, grouping). Pure: no I/O, no clock
of its own — time comes in with the observations and with `tick(now_ms)`.

Ordering and duplicates (the policy)
------------------------------------
- Per device the engine remembers the newest device time (and seq) it evaluated. An observation older
  than that is *stale*: it is not evaluated by the time-ordered kinds (threshold, state_duration,
  rate_of_change, schedule) — the device's newer message already says what the state is — but it is
  still a sign of life (absence) and its events still count in their window (event_count, by device
  time). A telemetry message with the device time of the newest telemetry and its seq (or, when either
  has none, its values) is a duplicate and is dropped; an event and a reading at one time are not.
- Events are counted once per device by (seq, device time) — or (device time, event name) without a
  seq — over the last `EVENT_MEMORY` events of the device, so a QoS 1 redelivery or a device resend
  never counts twice.
- Durations use device time between observations and the gateway clock from tick (see rules.timer), so
  clock skew cannot make a duration fire early.

Alarms
------
Kinds emit Signals; the engine keeps one Alarm per (rule, key): at most one open; a further firing
signal is a repeated occurrence (counted) or, with a more severe level, an escalation (urgency only
rises while open); a clear closes it. An alarm that opened and cleared more than `changes` times within
`window_s` is flapping: its clears are held back (it stays open, marked flapping) until its condition has
stayed clear for `quiet_s`. Correlation rules are fed with alarm openings and clears (after damping).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from rules.correlation import CorrelationParams, MemberChange
from rules.event_count import EventCountParams
from rules.kinds import KINDS, AnyParams, KindSpec, RuleParams
from rules.model import (
    Change,
    Evidence,
    Observation,
    Signal,
    Urgency,
    Verdict,
    context_from_json,
    context_json,
    group_key,
)
from rules.threshold import ThresholdParams

SNAPSHOT_VERSION = 1
EVENT_MEMORY = 32
_PLAN_CACHE_MAX = 20_000


class FlapPolicy(BaseModel):
    """Flapping damping: more than `changes` opens + clears within `window_s` → held open until the
    condition has stayed clear for `quiet_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    changes: int = Field(default=6, ge=2)
    window_s: float = Field(default=3600, gt=0)
    quiet_s: float = Field(default=900, ge=0)


class Variant(BaseModel):
    """A rule as overridden for a community or a device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: RuleParams
    urgency: Urgency
    enabled: bool = True


AttrValue = str | int | float | bool


class Rule(BaseModel):
    """A rule instance: a kind's parameters plus what the engine and the people need to know about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    device_type: str
    urgency: Urgency
    title_zh: str
    title_en: str
    description: str = ""
    params: RuleParams
    #: registry attribute conditions: the rule applies to a device whose attribute is one of the values
    where: dict[str, tuple[AttrValue, ...]] = {}
    #: device lifecycles the rule applies to (None: any)
    lifecycles: tuple[str, ...] | None = None
    #: evaluated and fed to correlations, but its verdicts are not handed on
    silent: bool = False
    enabled: bool = True
    flapping: FlapPolicy | None = None
    community_overrides: dict[str, Variant] = {}
    device_overrides: dict[str, Variant] = {}
    #: where it was declared ("file:line"); not part of its identity
    source: str = ""

    def fingerprint(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude={"source"}), sort_keys=True)


@dataclass(frozen=True)
class RuleSet:
    """Validated rules (see rules.loader.load_rules); ids are unique."""

    rules: tuple[Rule, ...]
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for r in self.rules:
            if r.id in seen:
                raise ValueError(f"duplicate rule id {r.id}")
            seen.add(r.id)

    @property
    def by_id(self) -> dict[str, Rule]:
        return {r.id: r for r in self.rules}

    def __len__(self) -> int:
        return len(self.rules)


class Alarm(NamedTuple):
    """The bookkeeping of one (rule, key). Plain data (`to_json`/`from_json`)."""

    open: bool
    since_ms: int
    urgency: str
    occurrences: int
    flapping: bool
    #: gateway times of recent opens and clears (for flapping)
    changes: tuple[int, ...]
    #: gateway time a clear was held back at (flapping), or -1
    held_ms: int
    ts_ms: int
    values: Mapping[str, Any]
    threshold: str
    members: tuple[str, ...] = ()
    grouped_into: str | None = None
    community: str | None = None
    grid_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = self._asdict()
        d["changes"] = list(self.changes)
        d["values"] = dict(self.values)
        d["members"] = list(self.members)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alarm:
        d = dict(data)
        d["changes"] = tuple(d["changes"])
        d["members"] = tuple(d.get("members") or ())
        return cls(**{k: d[k] for k in cls._fields if k in d})


@dataclass
class EngineStats:
    observations: int = 0
    evaluations: int = 0
    stale: int = 0
    duplicates: int = 0
    verdicts: int = 0


@dataclass(eq=False)
class _Compiled:
    rule: Rule
    spec: KindSpec
    params: AnyParams
    urgency: str
    fields: frozenset[str]
    events: frozenset[str]
    where: tuple[tuple[str, frozenset[AttrValue]], ...]
    lifecycles: frozenset[str] | None
    by_community: dict[str, Variant]
    by_device: dict[str, Variant]
    flap_changes: int
    flap_window_ms: int
    flap_quiet_ms: int
    #: state key is a group key (event_count per group, correlation) rather than the device id
    grouped: bool
    states: dict[str, Any] = field(default_factory=dict)
    #: key -> the due time of its entry in the engine's heap
    sched: dict[str, int] = field(default_factory=dict)
    #: correlation rules fed by this rule's alarms
    correlations: list[_Compiled] = field(default_factory=list)


_PlanEntry = tuple[_Compiled, Any, Any, bool, bool, "tuple[str, float, float] | None"]


def _screen(c: _Compiled) -> tuple[str, float, float] | None:
    """For a plain threshold (static limits, no overrides, no events): its field and good band."""
    p = c.params
    if (
        isinstance(p, ThresholdParams)
        and p.plan.band is not None
        and not p.fire_on_events
        and not (c.by_device or c.by_community or c.grouped)
    ):
        return (p.field, *p.plan.band)
    return None


class Engine:
    """Holds per-(rule, key) state and alarms; `process` observations, `tick` the clock."""

    def __init__(self, rules: RuleSet, *, flapping: FlapPolicy | None = None) -> None:
        self.flapping = flapping or FlapPolicy()
        self.stats = EngineStats()
        self._ctx: dict[str, Observation] = {}
        #: per device: newest device time evaluated, and the newest telemetry's time, seq and values
        self._last: dict[str, tuple[int, int, int | None, Mapping[str, Any] | None]] = {}
        self._events_seen: dict[str, dict[tuple[Any, ...], None]] = {}
        self._alarms: dict[str, dict[str, Alarm]] = {}
        self._held: dict[tuple[str, str], int] = {}
        #: (due, rule id, key): deadlines in a deterministic order, the same after a restore
        self._heap: list[tuple[int, str, str]] = []
        self._compile(rules)

    # ---- rule sets -------------------------------------------------------------------------------

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def _compile(self, rules: RuleSet, keep: dict[str, _Compiled] | None = None) -> None:
        self._rules = rules
        compiled: dict[str, _Compiled] = {}
        for r in rules.rules:
            variants = (*r.community_overrides.values(), *r.device_overrides.values())
            if not (r.enabled or any(v.enabled for v in variants)):
                continue
            spec = KINDS[r.params.kind]
            p: Any = r.params
            events: set[str] = set(p.reads_events())
            for v in variants:
                events |= set(v.params.reads_events())
            flap = r.flapping or self.flapping
            grouped = (isinstance(p, EventCountParams) and p.group_by != "device") or (
                isinstance(p, CorrelationParams) and p.group_by != "device"
            )
            c = _Compiled(
                rule=r,
                spec=spec,
                params=r.params,
                urgency=r.urgency,
                fields=frozenset(p.reads_fields()),
                events=frozenset(events),
                where=tuple((k, frozenset(v)) for k, v in r.where.items()),
                lifecycles=frozenset(r.lifecycles) if r.lifecycles is not None else None,
                by_community=dict(r.community_overrides),
                by_device=dict(r.device_overrides),
                flap_changes=flap.changes,
                flap_window_ms=int(flap.window_s * 1000),
                flap_quiet_ms=int(flap.quiet_s * 1000),
                grouped=grouped,
            )
            old = (keep or {}).get(r.id)
            if old is not None and old.spec.name == spec.name:
                c.states = old.states
            compiled[r.id] = c
        for c in compiled.values():
            if isinstance(c.params, CorrelationParams):
                for src in c.params.rules:
                    if src in compiled:
                        compiled[src].correlations.append(c)
        self._compiled = compiled
        self._by_type: dict[str, list[_Compiled]] = {}
        where: dict[str, set[str]] = {}
        for c in compiled.values():
            if not c.spec.derived:
                self._by_type.setdefault(c.rule.device_type, []).append(c)
                where.setdefault(c.rule.device_type, set()).update(a for a, _ in c.where)
        self._where_attrs = {t: tuple(sorted(a)) for t, a in where.items() if a}
        self._plans: dict[tuple[Any, ...], tuple[_PlanEntry, ...]] = {}
        self._reschedule_all()

    def swap(self, rules: RuleSet, now_ms: int) -> list[Verdict]:
        """Take a new rule set (a reload). State of rules whose id and kind are unchanged is kept (new
        parameters apply from the next evaluation; a running timer keeps its deadline); open alarms of
        rules that are gone or changed kind are cleared."""
        old = self._compiled
        self._compile(rules, keep=old)
        out: list[Verdict] = []
        for rid, c in old.items():
            new = self._compiled.get(rid)
            if new is not None and new.spec.name == c.spec.name:
                continue
            for key, a in sorted(self._alarms.pop(rid, {}).items()):
                if a.open and not c.rule.silent and a.grouped_into is None:
                    out.append(self._verdict(c, key, a._replace(open=False), "cleared", note="rule removed"))
            for k in [k for k in self._held if k[0] == rid]:
                del self._held[k]
        self.stats.verdicts += len(out)
        return out

    # ---- observations ----------------------------------------------------------------------------

    def process(self, obs: Observation, now_ms: int | None = None) -> list[Verdict]:
        """Evaluate one observation against the rules of its device type; the verdicts it causes."""
        return self._process(obs, obs.received_ms if now_ms is None else now_ms, None)

    def _process(
        self, obs: Observation, now: int, deferred: dict[tuple[Any, ...], list[Observation]] | None
    ) -> list[Verdict]:
        did = obs.device_id
        self.stats.observations += 1
        kind = obs.kind
        in_order = True
        if kind != "status":
            ts, seq = obs.ts_ms, obs.seq
            if kind == "event":
                seen = self._events_seen.get(did)
                ekey = (seq, ts) if seq is not None else (ts, obs.event)
                if seen is None:
                    self._events_seen[did] = {ekey: None}
                elif ekey in seen:
                    self.stats.duplicates += 1
                    return []
                else:
                    seen[ekey] = None
                    if len(seen) > EVENT_MEMORY:
                        del seen[next(iter(seen))]
            last = self._last.get(did)
            telemetry = kind == "telemetry"
            if last is None:
                self._last[did] = (ts, ts, seq, obs.values) if telemetry else (ts, -1, None, None)
            else:
                order_ts, tel_ts, tel_seq, tel_values = last
                if (
                    telemetry
                    and ts == tel_ts
                    and (
                        seq == tel_seq
                        if seq is not None and tel_seq is not None
                        else obs.values == tel_values
                    )
                ):
                    self.stats.duplicates += 1
                    return []
                if ts < order_ts:
                    in_order = False
                    self.stats.stale += 1
                elif telemetry:
                    self._last[did] = (ts, ts, seq, obs.values)
                elif ts > order_ts:
                    self._last[did] = (ts, tel_ts, tel_seq, tel_values)
        self._ctx[did] = obs
        dtype = obs.device_type
        wattrs = self._where_attrs.get(dtype)
        wvals = tuple(map(obs.attributes.get, wattrs)) if wattrs else ()
        pkey: tuple[Any, ...]
        if kind == "telemetry":
            pkey = (dtype, kind, tuple(obs.values), obs.lifecycle, wvals)
        elif kind == "event":
            pkey = (dtype, kind, obs.event, obs.lifecycle, wvals)
        else:
            pkey = (dtype, kind, None, obs.lifecycle, wvals)
        plan = self._plans.get(pkey)
        if plan is None:
            plan = self._plan(pkey, obs)
        out: list[Verdict] = []
        evaluations = 0
        screened = False
        values = obs.values
        for c, evaluate, due, ordered, special, screen in plan:
            if ordered and not in_order:
                continue
            evaluations += 1
            if screen is not None:
                # a plain threshold: a value inside its good band on a device without state is a no-op
                if deferred is not None:
                    screened = True
                    continue
                v = values[screen[0]]
                if screen[1] < v < screen[2] and did not in c.states:
                    continue
            params: Any = c.params
            key = did
            if special:
                urgency = c.urgency
                if c.by_device or c.by_community:
                    v = c.by_device.get(did) or (c.by_community.get(obs.community) if obs.community else None)
                    if v is not None:
                        if not v.enabled:
                            continue
                        params, urgency = v.params, v.urgency
                    elif not c.rule.enabled:
                        continue
                if c.grouped:
                    gk = group_key(params.group_by, obs)
                    if gk is None:
                        continue
                    key = gk
            states = c.states
            st = states.get(key)
            sigs, new = evaluate(params, obs, st, now)
            if new is not st:
                if new is None:
                    del states[key]
                else:
                    states[key] = new
                    d = due(params, new)
                    if d is not None:
                        cur = c.sched.get(key)
                        if cur is None or d < cur:
                            self._schedule(c, key, d)
            if sigs:
                if not special:
                    urgency = c.urgency
                for sig in sigs:
                    out.extend(self._on_signal(c, sig, urgency, params, now, obs))
        self.stats.evaluations += evaluations
        if screened and deferred is not None:
            group = deferred.get(pkey)
            if group is None:
                deferred[pkey] = [obs]
            else:
                group.append(obs)
        return out

    def process_batch(self, observations: Iterable[Observation]) -> list[Verdict]:
        """`process` each observation in order (numpy screening of batches was measured slower: see
        bench/rules_bench.py)."""
        out: list[Verdict] = []
        for obs in observations:
            out.extend(self._process(obs, obs.received_ms, None))
        return out

    def _plan(self, pkey: tuple[Any, ...], obs: Observation) -> tuple[_PlanEntry, ...]:
        """The rules an observation of this shape (type, kind, fields or event, lifecycle, `where`
        attributes) goes to; cached by shape, so the per-observation work is a dict lookup."""
        rules = self._by_type.get(obs.device_type, [])
        if obs.kind == "telemetry":
            keys = set(obs.values)
            chosen = [c for c in rules if c.spec.any_message or c.fields & keys]
        elif obs.kind == "event":
            chosen = [c for c in rules if c.spec.any_message or obs.event in c.events]
        else:
            chosen = [c for c in rules if c.spec.any_message]
        attrs = obs.attributes
        plan = tuple(
            (
                c,
                c.spec.evaluate,
                c.spec.due,
                c.spec.ordered,
                bool(c.by_device or c.by_community or c.grouped),
                _screen(c) if obs.kind == "telemetry" else None,
            )
            for c in chosen
            if (c.lifecycles is None or obs.lifecycle in c.lifecycles)
            and all(attrs.get(a) in allowed for a, allowed in c.where)
        )
        if len(self._plans) >= _PLAN_CACHE_MAX:
            self._plans.clear()
        self._plans[pkey] = plan
        return plan

    # ---- time ------------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Verdict]:
        """Let time act: for-durations that ran out, absences, schedule boundaries, quiet periods."""
        out: list[Verdict] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            d, rid, key = heapq.heappop(heap)
            c = self._compiled.get(rid)
            if c is None or c.sched.get(key) != d:
                continue
            del c.sched[key]
            st = c.states.get(key)
            if st is None:
                continue
            params, urgency, ctx = self._variant_for_key(c, key)
            d2 = c.spec.due(params, st)
            if d2 is None:
                continue
            if d2 > d:
                # the deadline moved later since this entry was pushed: take it up in its own turn
                self._schedule(c, key, d2)
                continue
            sigs, new = c.spec.tick(params, st, now_ms, key)
            if new is None:
                del c.states[key]
            else:
                c.states[key] = new
                d3 = c.spec.due(params, new)
                if d3 is not None:
                    self._schedule(c, key, max(d3, now_ms + 1))
            for sig in sigs:
                out.extend(self._on_signal(c, sig, urgency, params, now_ms, ctx))
        for (rid, key), held in sorted(self._held.items()):
            c = self._compiled.get(rid)
            if c is None:
                del self._held[(rid, key)]
            elif now_ms - held >= c.flap_quiet_ms:
                del self._held[(rid, key)]
                a = self._alarms[rid][key]
                out.extend(self._close(c, key, a, now_ms, a.ts_ms))
        return out

    def _variant_for_key(self, c: _Compiled, key: str) -> tuple[Any, str, Observation | None]:
        ctx = self._ctx.get(key)
        if ctx is not None and (c.by_device or c.by_community):
            v = c.by_device.get(key) or (c.by_community.get(ctx.community) if ctx.community else None)
            if v is not None:
                return v.params, v.urgency, ctx
        return c.params, c.urgency, ctx

    def _schedule(self, c: _Compiled, key: str, d: int) -> None:
        cur = c.sched.get(key)
        if cur is None or d < cur:
            c.sched[key] = d
            heapq.heappush(self._heap, (d, c.rule.id, key))

    def _reschedule_all(self) -> None:
        self._heap = []
        for c in self._compiled.values():
            c.sched = {}
            for key, st in c.states.items():
                params, _, _ = self._variant_for_key(c, key)
                d = c.spec.due(params, st)
                if d is not None:
                    self._schedule(c, key, d)

    def next_due(self) -> int | None:
        """The earliest gateway time at which `tick` has something to do (for the caller's timer)."""
        while self._heap:
            d, rid, key = self._heap[0]
            c = self._compiled.get(rid)
            if c is not None and c.sched.get(key) == d:
                break
            heapq.heappop(self._heap)
        times = [t for t in (self._heap[0][0] if self._heap else None,) if t is not None]
        for (rid, _), held in self._held.items():
            c = self._compiled.get(rid)
            if c is not None:
                times.append(held + c.flap_quiet_ms)
        return min(times) if times else None

    # ---- alarms ----------------------------------------------------------------------------------

    def _on_signal(
        self, c: _Compiled, sig: Signal, urgency: str, params: Any, now: int, ctx: Observation | None
    ) -> list[Verdict]:
        rid = c.rule.id
        key = sig.key
        alarms = self._alarms.get(rid)
        if alarms is None:
            alarms = self._alarms[rid] = {}
        a = alarms.get(key)
        if sig.level:
            urgency = params.levels[sig.level - 1].urgency
        if sig.firing:
            if a is None or not a.open:
                changes = _prune((*(a.changes if a else ()), now), now, c.flap_window_ms)
                a = Alarm(
                    True,
                    sig.ts_ms,
                    urgency,
                    1,
                    False,
                    changes,
                    -1,
                    sig.ts_ms,
                    sig.values,
                    sig.threshold,
                    sig.members,
                    self._group_of(c, key),
                    ctx.community if ctx else None,
                    ctx.grid_code if ctx else None,
                )
                alarms[key] = a
                out = self._emit(c, key, a, "opened")
                out += self._feed(c, key, True, sig.ts_ms, now)
                if isinstance(c.params, CorrelationParams) and c.params.suppress_members:
                    out += self._absorb(c, key, a)
                return out
            # open already
            if a.held_ms >= 0:
                self._held.pop((rid, key), None)
                a = a._replace(
                    held_ms=-1,
                    occurrences=a.occurrences + 1,
                    changes=_prune((*a.changes, now), now, c.flap_window_ms),
                    urgency=min(a.urgency, urgency),
                )
                alarms[key] = a
                return []
            if urgency < a.urgency:
                a = a._replace(urgency=urgency, ts_ms=sig.ts_ms, values=sig.values, threshold=sig.threshold)
                alarms[key] = a
                return self._emit(c, key, a, "escalated")
            if sig.occurrence:
                a = a._replace(
                    occurrences=a.occurrences + 1,
                    ts_ms=sig.ts_ms,
                    values=sig.values,
                    members=sig.members or a.members,
                )
                alarms[key] = a
                out = self._emit(c, key, a, "repeated")
                if isinstance(c.params, CorrelationParams) and c.params.suppress_members:
                    out += self._absorb(c, key, a)
                return out
            return []
        # cleared
        if a is None or not a.open:
            return []
        if a.held_ms >= 0:
            return []
        changes = _prune((*a.changes, now), now, c.flap_window_ms)
        if a.flapping or len(changes) > c.flap_changes:
            newly = not a.flapping
            a = a._replace(flapping=True, held_ms=now, changes=changes, ts_ms=sig.ts_ms)
            alarms[key] = a
            self._held[(rid, key)] = now
            return self._emit(c, key, a, "flapping") if newly else []
        return self._close(c, key, a._replace(changes=changes, values=sig.values), now, sig.ts_ms)

    def _close(self, c: _Compiled, key: str, a: Alarm, now: int, ts: int) -> list[Verdict]:
        a = a._replace(open=False, held_ms=-1, ts_ms=ts)
        self._alarms[c.rule.id][key] = a
        out = self._emit(c, key, a, "cleared")
        out += self._feed(c, key, False, ts, now)
        if not a.changes or now - a.changes[-1] > c.flap_window_ms:
            del self._alarms[c.rule.id][key]
        else:
            self._alarms[c.rule.id][key] = a._replace(flapping=False, grouped_into=None, occurrences=0)
        return out

    def _emit(self, c: _Compiled, key: str, a: Alarm, change: Change) -> list[Verdict]:
        if c.rule.silent or a.grouped_into is not None:
            return []
        self.stats.verdicts += 1
        return [self._verdict(c, key, a, change)]

    def _verdict(self, c: _Compiled, key: str, a: Alarm, change: Change, note: str = "") -> Verdict:
        r = c.rule
        firing = a.open and change != "cleared"
        vals = ", ".join(f"{k}={_fmt(v)}" for k, v in a.values.items())
        members = ""
        if a.members:
            shown = ", ".join(a.members[:10]) + (" …" if len(a.members) > 10 else "")
            members = f" [{len(a.members)}: {shown}]"
        if firing:
            zh = f"{r.title_zh}：{vals}（条件 {a.threshold}）{members}"
            en = f"{r.title_en}: {vals} (condition {a.threshold}){members}"
            if a.flapping:
                zh += "（频繁波动，保持告警）"
                en += " (flapping, held open)"
        elif a.grouped_into:
            zh = f"{r.title_zh}：已并入群组告警 {a.grouped_into}"
            en = f"{r.title_en}: taken into group alarm {a.grouped_into}"
        else:
            zh = f"{r.title_zh} 已恢复：{vals}"
            en = f"{r.title_en} cleared: {vals}"
            if note:
                zh += "（规则已删除）"
                en += f" ({note})"
        return Verdict(
            rule_id=r.id,
            key=key,
            device_id=None if c.grouped else key,
            device_type=r.device_type,
            state="firing" if firing else "cleared",
            change=change,
            urgency=a.urgency,  # type: ignore[arg-type]
            evidence=Evidence(a.ts_ms, a.values, a.threshold),
            message_zh=zh,
            message_en=en,
            since_ms=a.since_ms,
            occurrences=a.occurrences,
            flapping=a.flapping,
            members=a.members,
            grouped_into=a.grouped_into,
            community=a.community,
            grid_code=a.grid_code,
        )

    # ---- correlation -----------------------------------------------------------------------------

    def _feed(self, src: _Compiled, key: str, firing: bool, ts: int, now: int) -> list[Verdict]:
        """Tell the correlations that use `src` that its alarm on device `key` opened or cleared."""
        if not src.correlations or src.grouped:
            return []
        ctx = self._ctx.get(key)
        if ctx is None:
            return []
        out: list[Verdict] = []
        for corr in src.correlations:
            p: Any = corr.params
            gk = group_key(p.group_by, ctx)
            if gk is None:
                continue
            change = MemberChange(gk, key, src.rule.id, firing, ts)
            st = corr.states.get(gk)
            sigs, new = corr.spec.evaluate(p, change, st, now)
            if new is not st:
                if new is None:
                    del corr.states[gk]
                else:
                    corr.states[gk] = new
            for sig in sigs:
                out.extend(self._on_signal(corr, sig, corr.urgency, p, now, ctx))
        return out

    def _group_of(self, c: _Compiled, key: str) -> str | None:
        """The firing group alarm (with suppress_members) a new alarm of c on device `key` belongs to."""
        if not c.correlations or c.grouped:
            return None
        ctx = self._ctx.get(key)
        if ctx is None:
            return None
        for corr in c.correlations:
            p: Any = corr.params
            if not p.suppress_members:
                continue
            gk = group_key(p.group_by, ctx)
            if gk is None:
                continue
            st = corr.states.get(gk)
            if st is not None and st.firing:
                return gk
        return None

    def _absorb(self, corr: _Compiled, gk: str, group: Alarm) -> list[Verdict]:
        """Take the open member alarms of a firing group into it (reported cleared with grouped_into)."""
        out: list[Verdict] = []
        st = corr.states.get(gk)
        if st is None:
            return out
        for device_id, rid, _ in st.members:
            c = self._compiled.get(rid)
            a = self._alarms.get(rid, {}).get(device_id)
            if c is None or a is None or not a.open or a.grouped_into is not None:
                continue
            a = a._replace(grouped_into=gk)
            self._alarms[rid][device_id] = a
            if not c.rule.silent:
                self.stats.verdicts += 1
                out.append(self._verdict(c, device_id, a, "cleared"))
        return out

    # ---- incidents stage hooks -------------------------------------------------------------------

    def resolve(self, rule_id: str, key: str, now_ms: int) -> list[Verdict]:
        """Close an alarm from outside (the incident was closed by a person): its kind state starts anew,
        so the next occurrence opens a new alarm."""
        c = self._compiled.get(rule_id)
        a = self._alarms.get(rule_id, {}).get(key)
        if c is None or a is None or not a.open:
            return []
        c.states.pop(key, None)
        self._held.pop((rule_id, key), None)
        return self._close(c, key, a._replace(flapping=False), now_ms, now_ms)

    def restart_absence_clocks(self, now_ms: int) -> int:
        """After a restart: nothing was listening while the gateway was down, so a device's silence is
        counted again from `now_ms` (absence rules not already firing); otherwise every device would look
        absent at once and raise a storm of offline cases that clear with its next report. Returns how
        many clocks were restarted."""
        from rules.absence import AbsenceState

        n = 0
        for c in self._compiled.values():
            if c.spec.name != "absence":
                continue
            for key, st in c.states.items():
                if isinstance(st, AbsenceState) and not st.firing and st.last_rx < now_ms:
                    c.states[key] = st._replace(last_rx=now_ms)
                    n += 1
        if n:
            self._reschedule_all()
        return n

    def forget_device(self, device_id: str) -> None:
        """Drop everything known about a device (retired). Its open alarms are dropped without verdicts."""
        for rid, c in self._compiled.items():
            c.states.pop(device_id, None)
            self._alarms.get(rid, {}).pop(device_id, None)
            self._held.pop((rid, device_id), None)
        self._ctx.pop(device_id, None)
        self._last.pop(device_id, None)
        self._events_seen.pop(device_id, None)

    def open_alarms(self) -> list[Verdict]:
        """The alarms open now (including silent rules' and grouped ones), as firing verdicts."""
        out = []
        for rid, alarms in sorted(self._alarms.items()):
            c = self._compiled.get(rid)
            if c is None:
                continue
            for key, a in sorted(alarms.items()):
                if a.open:
                    out.append(self._verdict(c, key, a, "opened"))
        return out

    # ---- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """All state as JSON-able data: kind states, alarms, and per device its context and order mark."""
        return {
            "version": SNAPSHOT_VERSION,
            "rules": {
                rid: {
                    "kind": c.spec.name,
                    "states": {k: s.to_json() for k, s in c.states.items()},
                }
                for rid, c in self._compiled.items()
                if c.states
            },
            "alarms": {
                rid: {k: a.to_json() for k, a in alarms.items()}
                for rid, alarms in self._alarms.items()
                if alarms
            },
            "devices": {
                did: {
                    "context": context_json(obs),
                    "last": list(self._last[did][:3]) if did in self._last else None,
                    "events": [list(k) for k in self._events_seen.get(did, {})],
                }
                for did, obs in self._ctx.items()
            },
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Resume from a snapshot (taken by this or an earlier engine). States of rules that no longer exist
        or changed kind are dropped."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported rules snapshot version {data.get('version')!r}")
        for rid, rs in data.get("rules", {}).items():
            c = self._compiled.get(rid)
            if c is None or c.spec.name != rs.get("kind"):
                continue
            c.states = {k: c.spec.state_from_json(v) for k, v in rs["states"].items()}
        self._alarms = {}
        self._held = {}
        kinds = {rid: rs.get("kind") for rid, rs in data.get("rules", {}).items()}
        for rid, alarms in data.get("alarms", {}).items():
            c = self._compiled.get(rid)
            if c is None or kinds.get(rid, c.spec.name) != c.spec.name:
                continue
            restored = {k: Alarm.from_json(v) for k, v in alarms.items()}
            self._alarms[rid] = restored
            for k, a in restored.items():
                if a.open and a.held_ms >= 0:
                    self._held[(rid, k)] = a.held_ms
        for did, d in data.get("devices", {}).items():
            self._ctx[did] = context_from_json(did, d["context"])
            if d.get("last"):
                order_ts, tel_ts, tel_seq = d["last"]
                self._last[did] = (int(order_ts), int(tel_ts), tel_seq, None)
            self._events_seen[did] = {tuple(k): None for k in d.get("events", [])}
        self._plans = {}
        self._reschedule_all()


def _prune(changes: tuple[int, ...], now: int, window_ms: int) -> tuple[int, ...]:
    if changes and now - changes[0] > window_ms:
        return tuple(t for t in changes if now - t <= window_ms)
    return changes


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)

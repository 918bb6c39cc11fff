"""Benchmark: the full default rule set over a synthetic mix of 5,000 devices, in one process.

Prints observations/s and µs per observation for
  - the baseline: the same loop over the same observations, doing nothing but read them,
  - the plain engine (Engine.process, one observation at a time, ticking once per simulated second),
  - the numpy variant (batches, plain thresholds screened with numpy: NumpyScreenedEngine below),
and the estimated share rules would take of the gateway's time per message. Not part of the test suite:
run `.venv/bin/python bench/rules_bench.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rules.engine import Engine
from rules.loader import load_default_rules
from rules.model import Observation, Verdict

TYPES = ("streetlight", "parking_sensor", "manhole_cover", "access_control", "smoke_detector")
T0 = 1_795_239_454_000  # 2026-11-21T13:37:34+08:00


def devices(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        t = TYPES[i % len(TYPES)]
        attrs: dict[str, Any] = {}
        if t == "streetlight":
            attrs = {"rated_power_w": 100.0, "schedule": "18:00-06:00", "circuit": f"C{i // 50:03d}"}
        elif t == "parking_sensor":
            kind = ("normal", "fire_lane", "no_parking", "time_limited")[int(rng.integers(0, 4))]
            attrs = {"bay_kind": kind}
            if kind == "time_limited":
                attrs["time_limit_min"] = 120.0
        elif t == "manhole_cover":
            attrs = {"tilt_baseline_deg": float(rng.uniform(0, 3))}
        elif t == "access_control":
            attrs = {"held_open_limit_s": 60.0}
        out.append(
            {
                "device_id": f"b-{t[:2]}-{i:06d}",
                "device_type": t,
                "community": f"bench-{i % 20:02d}",
                "grid_code": f"110101001{i % 20:03d}{i % 7:03d}",
                "building": f"B{i % 40}",
                "attributes": attrs,
            }
        )
    return out


def values_for(t: str, rng: np.random.Generator, alarm: bool) -> tuple[str, dict[str, Any], str | None]:
    """Mostly normal readings; `alarm` picks a value past a threshold (about 1 % of messages)."""
    r = float(rng.random())
    if t == "streetlight":
        on = r < 0.5
        return (
            "telemetry",
            {
                "lamp_on": on,
                "dimming_pct": 80.0,
                "voltage_v": 250.0 if alarm else 221.0 + r,
                "current_a": 0.4 if on else 0.0,
                "power_w": 90.0 if on else 0.0,
                "power_factor": 0.95,
                "energy_kwh": 1234.5,
                "leakage_ma": 40.0 if alarm else 2.0 * r,
                "pole_tilt_deg": 0.5,
                "lux": 5.0 if on else 3000.0,
            },
            None,
        )
    if t == "parking_sensor":
        return (
            "telemetry",
            {"occupied": r < 0.4, "mag_x": 12.5, "mag_y": -40.1, "mag_z": 88.0, "battery_pct": 64.0},
            None,
        )
    if t == "manhole_cover":
        return (
            "telemetry",
            {
                "tilt_deg": 15.0 if alarm else 1.0 + r,
                "cover_open": False,
                "water_level_cm": 180.0,
                "ch4_lel_pct": 30.0 if alarm else 1.0,
                "h2s_ppm": 0.5,
                "co_ppm": 2.0,
                "o2_pct": 20.9,
                "battery_pct": 87.0,
                "rssi_dbm": -91.0,
            },
            None,
        )
    if t == "access_control":
        if r < 0.3:
            ev = "access_denied" if alarm else "access_granted"
            return "event", {"method": "card", "reason": "expired"} if alarm else {"method": "card"}, ev
        return "telemetry", {"door_open": r < 0.15, "battery_pct": 70.0}, None
    if r < 0.05:
        return "event", {}, "self_test"
    return (
        "telemetry",
        {
            "alarm": alarm,
            "smoke_obscuration_pct_m": 0.1,
            "temperature_c": 22.0,
            "battery_pct": 90.0,
            "rssi_dbm": -80.0,
        },
        None,
    )


def build(n_devices: int, n_obs: int, rate: int, seed: int) -> list[Observation]:
    rng = np.random.default_rng(seed)
    devs = devices(n_devices, rng)
    picks = rng.integers(0, n_devices, n_obs)
    alarms = rng.random(n_obs) < 0.01
    step_ms = 1000 / rate
    out = []
    seq: dict[str, int] = {}
    for i in range(n_obs):
        d = devs[int(picks[i])]
        kind, values, event = values_for(d["device_type"], rng, bool(alarms[i]))
        t = T0 + int(i * step_ms)
        s = seq.get(d["device_id"], 0) + 1
        seq[d["device_id"]] = s
        out.append(
            Observation(
                d["device_id"],
                d["device_type"],
                kind,  # type: ignore[arg-type]
                t,
                t,
                values,
                event=event,
                seq=s,
                community=d["community"],
                grid_code=d["grid_code"],
                building=d["building"],
                attributes=d["attributes"],
            )
        )
    return out


def run_baseline(observations: list[Observation]) -> float:
    sink = 0
    t = time.perf_counter()
    for obs in observations:
        sink += len(obs.values)
    return time.perf_counter() - t


def run_plain(observations: list[Observation], tick_every_ms: int) -> tuple[float, int, Engine]:
    engine = Engine(load_default_rules())
    verdicts = 0
    next_tick = observations[0].received_ms + tick_every_ms
    gc.collect()
    t = time.perf_counter()
    for obs in observations:
        if obs.received_ms >= next_tick:
            verdicts += len(engine.tick(obs.received_ms))
            next_tick += tick_every_ms
        verdicts += len(engine.process(obs))
    return time.perf_counter() - t, verdicts, engine


_NP_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}


class NumpyScreenedEngine(Engine):
    """The numpy variant: plain thresholds (static limits, no overrides) are left out of the per-message
    loop and screened per batch with numpy; only readings past a limit, or of devices with state, are
    then evaluated (in order). Same verdicts; measured against the plain loop, which screens the same
    thresholds inline with one comparison."""

    def process_batch(self, observations: Iterable[Observation]) -> list[Verdict]:
        deferred: dict[tuple[Any, ...], list[Observation]] = {}
        out: list[Verdict] = []
        for obs in observations:
            out.extend(self._process(obs, obs.received_ms, deferred))
        for pkey, group in deferred.items():
            for c, evaluate, due, _, _, screen in self._plans.get(pkey) or self._plan(pkey, group[0]):
                if screen is not None:
                    out.extend(self._screen(c, evaluate, due, group))
        return out

    def _screen(self, c: Any, evaluate: Any, due: Any, group: list[Observation]) -> list[Verdict]:
        p = c.params
        plan = p.plan
        values = np.fromiter((o.values[p.field] for o in group), dtype=np.float64, count=len(group))
        bad = np.zeros(len(group), dtype=bool)
        for cmp in (plan.hi, plan.lo, *plan.levels):
            if cmp is not None:
                bad |= _NP_OPS[cmp.op](values, cmp.limit)
        states = c.states
        out: list[Verdict] = []
        for o, b in zip(group, bad.tolist(), strict=True):
            if not b and o.device_id not in states:
                continue
            key = o.device_id
            st = states.get(key)
            sigs, new = evaluate(p, o, st, o.received_ms)
            if new is not st:
                if new is None:
                    del states[key]
                else:
                    states[key] = new
                    d = due(p, new)
                    if d is not None:
                        self._schedule(c, key, d)
            for sig in sigs:
                out.extend(self._on_signal(c, sig, c.urgency, p, o.received_ms, o))
        return out


def run_batch(observations: list[Observation], batch: int, tick_every_ms: int) -> tuple[float, int, Engine]:
    engine = NumpyScreenedEngine(load_default_rules())
    verdicts = 0
    next_tick = observations[0].received_ms + tick_every_ms
    gc.collect()
    t = time.perf_counter()
    for i in range(0, len(observations), batch):
        chunk = observations[i : i + batch]
        verdicts += len(engine.process_batch(chunk))
        if chunk[-1].received_ms >= next_tick:
            verdicts += len(engine.tick(chunk[-1].received_ms))
            next_tick += tick_every_ms
    return time.perf_counter() - t, verdicts, engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=5000)
    ap.add_argument("--observations", type=int, default=200_000)
    ap.add_argument("--rate", type=int, default=20_000, help="simulated messages per second (device time)")
    ap.add_argument("--batch", type=int, default=500, help="batch size of the numpy variant")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--gateway-us",
        type=float,
        default=63.0,
        help="gateway CPU µs per message without rules (README figures: 116 %% of a core at 18,300 msg/s)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    observations = build(a.devices, a.observations, a.rate, a.seed)
    n = len(observations)
    base = min(run_baseline(observations) for _ in range(3))
    plain_t, plain_v, engine = min((run_plain(observations, 1000) for _ in range(3)), key=lambda r: r[0])
    batch_t, batch_v, _ = min((run_batch(observations, a.batch, 1000) for _ in range(3)), key=lambda r: r[0])
    per_obs_us = plain_t / n * 1e6
    evals = engine.stats.evaluations / n
    fig = {
        "devices": a.devices,
        "observations": n,
        "rules": len(engine.rules),
        "rule_evaluations_per_observation": round(evals, 2),
        "baseline_obs_per_s": round(n / base),
        "plain_obs_per_s": round(n / plain_t),
        "plain_us_per_obs": round(per_obs_us, 2),
        "plain_us_per_rule_evaluation": round(per_obs_us / evals, 2),
        "numpy_obs_per_s": round(n / batch_t),
        "numpy_us_per_obs": round(batch_t / n * 1e6, 2),
        "numpy_vs_plain": round(plain_t / batch_t, 2),
        "verdicts_plain": plain_v,
        "verdicts_numpy": batch_v,
        "estimated_gateway_throughput_drop_pct": round(100 * per_obs_us / (a.gateway_us + per_obs_us), 1),
    }
    if a.json:
        print(json.dumps(fig))
        return
    print(
        f"{n:,} observations from {a.devices:,} devices, {fig['rules']} rules, "
        f"{evals:.2f} applicable rules per observation"
    )
    print(f"baseline (read each observation)   {fig['baseline_obs_per_s']:>12,} obs/s")
    print(
        f"plain engine (process + tick)      {fig['plain_obs_per_s']:>12,} obs/s  "
        f"{fig['plain_us_per_obs']} µs/obs, {fig['plain_us_per_rule_evaluation']} µs/rule evaluation"
    )
    print(
        f"numpy-screened batches of {a.batch:<5}   {fig['numpy_obs_per_s']:>12,} obs/s  "
        f"{fig['numpy_us_per_obs']} µs/obs ({fig['numpy_vs_plain']}× the plain loop)"
    )
    print(f"verdicts: plain {plain_v:,}, numpy {batch_v:,} (must be equal)")
    print(
        f"at {a.gateway_us} µs of gateway CPU per message without rules, rules would cut its throughput "
        f"by about {fig['estimated_gateway_throughput_drop_pct']} %"
    )


if __name__ == "__main__":
    main()

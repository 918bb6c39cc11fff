"""A simulated community: the registration rows (place, responsible unit, codes, attributes) of its devices.

Run as ``python -m simulators.community --seed 1 --out devices.csv`` to write them as CSV for bulk
registration. The same rows drive ``simulators.run``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from devices import THING_MODELS

#: the keys of a registration row, in CSV column order
ROW_KEYS: tuple[str, ...] = (
    "device_id",
    "device_type",
    "district",
    "street",
    "community",
    "grid_code",
    "building",
    "address",
    "lat",
    "lon",
    "responsible_unit",
    "component_code",
    "attributes",
)

#: short id prefix of each device type (device ids look like ``c001-mh-0001``)
ID_PREFIXES: dict[str, str] = {
    "manhole_cover": "mh",
    "streetlight": "sl",
    "access_control": "ac",
    "parking_sensor": "pk",
    "smoke_detector": "sd",
}

#: a few county-level administrative codes (GB/T 2260) and their names; others show the code itself
DISTRICT_NAMES: dict[str, str] = {
    "110101": "东城区",
    "110102": "西城区",
    "110105": "朝阳区",
    "110106": "丰台区",
    "110108": "海淀区",
    "310101": "黄浦区",
    "320508": "姑苏区",
    "440106": "天河区",
}

#: manhole cover owner classes (major 01 公用设施 + minor) -> weight, responsible unit
COVER_OWNERS: dict[str, tuple[float, str]] = {
    "0101": (0.25, "市自来水集团"),  # 上水井盖
    "0102": (0.30, "市排水集团"),  # 污水井盖
    "0103": (0.30, "市排水集团"),  # 雨水井盖
    "0111": (0.15, "市燃气集团"),  # 燃气井盖
}
STREETLIGHT_CLASS = "0118"  # 路灯

DEFAULT_ORIGIN = (39.91, 116.40)
#: extent of a community on the ground, metres (east-west, north-south)
AREA_M = (600.0, 400.0)
_M_PER_DEG_LAT = 111_320.0

_DIGITS = {"admin_code": 6, "street": 3, "community": 3}


def generate_community(
    name: str,
    *,
    seed: int,
    admin_code: str = "110101",
    street: str = "001",
    community: str = "001",
    grids: int = 3,
    buildings: int = 4,
    covers: int = 6,
    poles: int = 8,
    doors: int = 6,
    bays: int = 10,
    detectors: int = 12,
    slug: str | None = None,
    district_name: str | None = None,
    street_name: str | None = None,
    origin: tuple[float, float] | None = None,
    component_serial_start: int | None = None,
) -> list[dict[str, Any]]:
    """The registration rows of one community's devices; the same arguments always give the same rows.

    - ``name``: the community's name as people see it, e.g. "和平里社区".
    - ``slug``: prefix of the device ids, default ``c{community}``: give communities that share a
      community code (in different streets) distinct slugs.
    - ``origin``: (lat, lon) of the community's south-west corner; default a point near 39.91, 116.40
      offset by the street and community codes, so that neighbouring communities do not overlap.
    - ``component_serial_start``: first 6-digit serial of the component codes, default
      ``community * 1000`` (unique within a street).

    Grids are strips of the community's area from west to east; a device is in the grid its position
    falls in. Covers, poles, parking bays and community gates have no building (``None``).
    """
    codes = {"admin_code": admin_code, "street": street, "community": community}
    for key, value in codes.items():
        if not re.fullmatch(rf"\d{{{_DIGITS[key]}}}", value):
            raise ValueError(f"{key} must be {_DIGITS[key]} digits, got {value!r}")
    if not 1 <= grids <= 999:
        raise ValueError(f"grids must be 1..999, got {grids}")
    if buildings < 1:
        raise ValueError(f"buildings must be >= 1, got {buildings}")
    counts = {"covers": covers, "poles": poles, "doors": doors, "bays": bays, "detectors": detectors}
    for key, n in counts.items():
        if not 0 <= n <= 9999:
            raise ValueError(f"{key} must be 0..9999, got {n}")
    if covers + poles > 999_999 - (component_serial_start or int(community) * 1000):
        raise ValueError("too many components for the 6-digit serial")

    return _Builder(
        name=name,
        rng=random.Random(f"community|{seed}|{admin_code}{street}{community}|{name}"),
        admin_code=admin_code,
        street_code=street,
        community_code=community,
        grids=grids,
        slug=slug or f"c{community}",
        district=district_name or DISTRICT_NAMES.get(admin_code, admin_code),
        street=street_name or f"{_short(name)}街道",
        origin=origin or _default_origin(street, community),
        serial=component_serial_start if component_serial_start is not None else int(community) * 1000,
    ).build(buildings, covers=covers, poles=poles, doors=doors, bays=bays, detectors=detectors)


def _short(name: str) -> str:
    """ "和平里社区" -> "和平里"."""
    for suffix in ("社区", "小区"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _default_origin(street: str, community: str) -> tuple[float, float]:
    lat0, lon0 = DEFAULT_ORIGIN
    return (lat0 + 0.008 * ((int(street) - 1) % 10), lon0 + 0.009 * ((int(community) - 1) % 10))


class _Builder:
    """Lays out buildings on the ground, then places each kind of device around them."""

    def __init__(
        self,
        *,
        name: str,
        rng: random.Random,
        admin_code: str,
        street_code: str,
        community_code: str,
        grids: int,
        slug: str,
        district: str,
        street: str,
        origin: tuple[float, float],
        serial: int,
    ) -> None:
        self.name = name
        self.rng = rng
        self.admin_code = admin_code
        self.grid_prefix = admin_code + street_code + community_code
        self.grids = grids
        self.slug = slug
        self.district = district
        self.street = street
        self.origin = origin
        self.serial = serial
        self.property_unit = f"{_short(name)}物业"
        self.lighting_unit = f"{district}路灯管理所" if district in DISTRICT_NAMES.values() else "路灯管理所"
        self.rows: list[dict[str, Any]] = []
        self.numbers: dict[str, int] = {}
        self.buildings: list[tuple[str, float, float, int]] = []  # (name, x, y, floors)

    # -- geometry ------------------------------------------------------------------------------------

    def _layout(self, n: int) -> None:
        width, height = AREA_M
        cols = max(1, math.ceil(math.sqrt(n * width / height)))
        rows = math.ceil(n / cols)
        for k in range(n):
            r, c = divmod(k, cols)
            x = (c + 0.5) * width / cols + self.rng.uniform(-8, 8)
            y = (r + 0.5) * height / rows + self.rng.uniform(-8, 8)
            floors = self.rng.choice((6, 6, 11, 18, 24))
            self.buildings.append((f"{k + 1}号楼", x, y, floors))

    def _near(self, x: float, y: float, lo: float, hi: float) -> tuple[float, float]:
        angle = self.rng.uniform(0, 2 * math.pi)
        dist = self.rng.uniform(lo, hi)
        width, height = AREA_M
        return (
            min(max(x + dist * math.cos(angle), 1.0), width - 1.0),
            min(max(y + dist * math.sin(angle), 1.0), height - 1.0),
        )

    def _grid_code(self, x: float) -> str:
        k = min(int(x / AREA_M[0] * self.grids), self.grids - 1)
        return f"{self.grid_prefix}{k + 1:03d}"

    def _latlon(self, x: float, y: float) -> tuple[float, float]:
        lat0, lon0 = self.origin
        lat = lat0 + y / _M_PER_DEG_LAT
        lon = lon0 + x / (_M_PER_DEG_LAT * math.cos(math.radians(lat0)))
        return round(lat, 6), round(lon, 6)

    @staticmethod
    def _side(dx: float, dy: float) -> str:
        if abs(dx) > abs(dy):
            return "东侧" if dx > 0 else "西侧"
        return "北侧" if dy > 0 else "南侧"

    # -- rows -----------------------------------------------------------------------------------------

    def _add(
        self,
        device_type: str,
        *,
        x: float,
        y: float,
        building: str | None,
        address: str,
        responsible_unit: str,
        attributes: dict[str, Any],
        component_class: str | None = None,
    ) -> None:
        model = THING_MODELS[device_type]
        unknown = set(attributes) - {f.name for f in model.attributes}
        if unknown:  # a registry attribute the thing model does not declare is a bug here
            raise ValueError(f"{device_type} declares no attribute {sorted(unknown)}")
        n = self.numbers[device_type] = self.numbers.get(device_type, 0) + 1
        component_code = None
        if component_class is not None:
            self.serial += 1
            component_code = f"{self.admin_code}{component_class}{self.serial:06d}"
        lat, lon = self._latlon(x, y)
        self.rows.append(
            {
                "device_id": f"{self.slug}-{ID_PREFIXES[device_type]}-{n:04d}",
                "device_type": device_type,
                "district": self.district,
                "street": self.street,
                "community": self.name,
                "grid_code": self._grid_code(x),
                "building": building,
                "address": address,
                "lat": lat,
                "lon": lon,
                "responsible_unit": responsible_unit,
                "component_code": component_code,
                "attributes": attributes,
            }
        )

    def _anchor(self) -> tuple[str, float, float, int]:
        return self.rng.choice(self.buildings)

    def build(
        self, n_buildings: int, *, covers: int, poles: int, doors: int, bays: int, detectors: int
    ) -> list[dict[str, Any]]:
        self._layout(n_buildings)
        owners = list(COVER_OWNERS)
        weights = [COVER_OWNERS[o][0] for o in owners]
        for _ in range(covers):
            bname, bx, by, _f = self._anchor()
            x, y = self._near(bx, by, 15, 45)
            owner = self.rng.choices(owners, weights)[0]
            self._add(
                "manhole_cover",
                x=x,
                y=y,
                building=None,
                address=f"{self.name}{bname}{self._side(x - bx, y - by)}道路",
                responsible_unit=COVER_OWNERS[owner][1],
                component_class=owner,
                attributes={
                    "owner_class": owner,
                    "tilt_baseline_deg": round(self.rng.uniform(0.0, 2.5), 1),
                    "depth_cm": float(self.rng.choice((120, 150, 180, 200, 250, 300, 400))),
                },
            )
        for k in range(poles):
            bname, bx, by, _f = self.buildings[k % len(self.buildings)]
            x, y = self._near(bx, by, 20, 40)
            self._add(
                "streetlight",
                x=x,
                y=y,
                building=None,
                address=f"{self.name}{bname}{self._side(x - bx, y - by)}路灯{k + 1}号杆",
                responsible_unit=self.lighting_unit,
                component_class=STREETLIGHT_CLASS,
                attributes={
                    "rated_power_w": float(self.rng.choice((60, 80, 100, 120, 150))),
                    "schedule": "18:00-06:00",
                    "circuit": f"{k // 4 + 1}号回路",
                },
            )
        gates = ["东门", "南门", "西门", "北门"][: (0 if doors == 0 else 1 if doors < 4 else 2)]
        for k in range(doors):
            if k < len(gates):
                width, height = AREA_M
                x, y = {"东门": (width - 2, height / 2), "南门": (width / 2, 2), "西门": (2, height / 2)}.get(
                    gates[k], (width / 2, height - 2)
                )
                building, door_name, limit = None, gates[k], 120.0
                address = f"{self.name}{door_name}"
            else:
                j = k - len(gates)
                bname, bx, by, _f = self.buildings[j % len(self.buildings)]
                unit = j // len(self.buildings) + 1
                x, y = self._near(bx, by, 5, 12)
                building, door_name, limit = bname, f"{bname}{unit}单元门", 60.0
                address = f"{self.name}{door_name}"
            self._add(
                "access_control",
                x=x,
                y=y,
                building=building,
                address=address,
                responsible_unit=self.property_unit,
                attributes={"door_name": door_name, "held_open_limit_s": limit},
            )
        kinds = self._bay_kinds(bays)
        for k, kind in enumerate(kinds):
            bname, bx, by, _f = self._anchor()
            x, y = self._near(bx, by, 10, 30)
            where = "消防通道" if kind == "fire_lane" else "停车位"
            attrs: dict[str, Any] = {"bay_kind": kind}
            if kind == "time_limited":
                attrs["time_limit_min"] = 120.0
            self._add(
                "parking_sensor",
                x=x,
                y=y,
                building=None,
                address=f"{self.name}{bname}{self._side(x - bx, y - by)}{where}{k + 1:02d}号",
                responsible_unit=self.property_unit,
                attributes=attrs,
            )
        for k in range(detectors):
            bname, bx, by, floors = self.buildings[k % len(self.buildings)]
            x, y = self._near(bx, by, 0, 8)
            floor = self.rng.randint(1, floors)
            unit = self.rng.randint(1, 3)
            room = f"{floor}{self.rng.randint(1, 4):02d}"
            self._add(
                "smoke_detector",
                x=x,
                y=y,
                building=bname,
                address=f"{self.name}{bname}{unit}单元{room}室",
                responsible_unit=self.property_unit,
                attributes={"floor": floor},
            )
        return self.rows

    def _bay_kinds(self, n: int) -> list[str]:
        fire = 0 if n < 2 else 1 if n < 8 else 2
        timed = 1 if n >= 3 else 0
        kinds = ["fire_lane"] * fire + ["time_limited"] * timed
        kinds += ["normal"] * (n - len(kinds))
        self.rng.shuffle(kinds)
        return kinds


# -- CSV --------------------------------------------------------------------------------------------


def write_devices_csv(rows: Iterable[Mapping[str, Any]], out: Path | str | TextIO) -> None:
    """Write rows as CSV: one column per row key, ``attributes`` as JSON text, ``None`` as empty."""
    if isinstance(out, (str, Path)):
        with open(out, "w", encoding="utf-8", newline="") as fh:
            _write(rows, fh)
    else:
        _write(rows, out)


def _write(rows: Iterable[Mapping[str, Any]], fh: TextIO) -> None:
    # The registry's import format: one `attr.<name>` column per attribute (installers edit these in
    # spreadsheets), so this file can go straight into `sc-gateway devices import`.
    rows = list(rows)
    attr_names = sorted({name for row in rows for name in (row.get("attributes") or {})})
    columns = [k for k in ROW_KEYS if k != "attributes"] + [f"attr.{n}" for n in attr_names]
    writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: ("" if row.get(k) is None else row[k]) for k in ROW_KEYS if k != "attributes"}
        for name, value in (row.get("attributes") or {}).items():
            out[f"attr.{name}"] = value
        writer.writerow(out)


def _attr_value(device_type: str, name: str, text: str) -> Any:
    for f in THING_MODELS[device_type].attributes:
        if f.name == name:
            return f.kind(text) if f.kind is not bool else text.lower() in ("1", "true", "yes")
    return text


def read_devices_csv(source: Path | str | TextIO) -> list[dict[str, Any]]:
    """Read rows written by ``write_devices_csv`` (or edited by hand) back into row dicts."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8-sig", newline="") as fh:
            return _read(fh, str(source))
    return _read(source, "<csv>")


def _read(fh: TextIO, where: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(fh)
    missing = {"device_id", "device_type"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{where}: missing column(s) {sorted(missing)}")
    rows: list[dict[str, Any]] = []
    for line, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {k: (v if v != "" else None) for k, v in raw.items() if k in ROW_KEYS}
        if row.get("device_type") not in THING_MODELS:
            raise ValueError(f"{where}:{line}: unknown device_type {row.get('device_type')!r}")
        for key in ("lat", "lon"):
            if row.get(key) is not None:
                row[key] = float(row[key])
        try:
            attrs = json.loads(row["attributes"]) if row.get("attributes") else {}
            for k, v in raw.items():
                if k and k.startswith("attr.") and v not in ("", None):
                    attrs[k[5:]] = _attr_value(row["device_type"], k[5:], v)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{where}:{line}: bad attributes: {exc}") from None
        row["attributes"] = attrs
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.community", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="和平里社区", help="community name (default 和平里社区)")
    p.add_argument("--admin-code", default="110101", help="6-digit county-level code (default 110101)")
    p.add_argument("--street", default="001", help="3-digit street code")
    p.add_argument("--community", default="001", help="3-digit community code")
    p.add_argument("--slug", default=None, help="device id prefix (default c<community>)")
    p.add_argument("--grids", type=int, default=3)
    p.add_argument("--buildings", type=int, default=4)
    for key, default in (("covers", 6), ("poles", 8), ("doors", 6), ("bays", 10), ("detectors", 12)):
        p.add_argument(f"--{key}", type=int, default=default)
    p.add_argument("--out", default="-", help="CSV file to write (default: standard output)")
    a = p.parse_args(argv)
    rows = generate_community(
        a.name,
        seed=a.seed,
        admin_code=a.admin_code,
        street=a.street,
        community=a.community,
        slug=a.slug,
        grids=a.grids,
        buildings=a.buildings,
        covers=a.covers,
        poles=a.poles,
        doors=a.doors,
        bays=a.bays,
        detectors=a.detectors,
    )
    if a.out == "-":
        _write(rows, sys.stdout)
    else:
        write_devices_csv(rows, a.out)
        print(f"{len(rows)} devices written to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

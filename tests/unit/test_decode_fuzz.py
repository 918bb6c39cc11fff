"""Nothing a device sends can crash the decode stage: any topic and any bytes end as an outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import THING_MODELS
from gateway.decode import Decoder
from gateway.lineproto import to_line
from gateway.messages import Duplicate, RawMessage, Reading, Rejection


@dataclass(frozen=True)
class Dev:
    device_id: str
    device_type: str
    community: str | None = "和平里 社区,=x"
    grid_code: str | None = "110101001001001"
    lifecycle: str = "in_service"


DEVICES = {f"d-{t}": Dev(f"d-{t}", t) for t in THING_MODELS}
NOW = 1_795_239_454_000

topics = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda t, d, k: f"sc/v1/{t}/{d}/{k}",
        st.sampled_from([*THING_MODELS, "fridge", ""]),
        st.sampled_from([*DEVICES, "nobody", "bad id", "x" * 70]),
        st.sampled_from(["telemetry", "event", "status", "cmd", ""]),
    ),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


def _field_docs() -> st.SearchStrategy[bytes]:
    names = sorted({f.name for m in THING_MODELS.values() for f in m.telemetry} | {"ts", "seq", "event"})
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), json_values, max_size=6).map(
        lambda d: json.dumps(d, allow_nan=True).encode()
    )


payloads = st.one_of(st.binary(max_size=300), _field_docs())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=topics, payload=payloads)
def test_any_topic_and_payload_ends_as_an_outcome_and_readings_make_valid_lines(
    topic: str, payload: bytes
) -> None:
    dec = Decoder(DEVICES.get, credential_key=b"k")
    out = dec.decode(RawMessage(topic, payload, NOW))
    assert isinstance(out, Reading | Rejection | Duplicate)
    if isinstance(out, Rejection):
        assert out.detail  # a reason a person can read
    if isinstance(out, Reading):
        line = to_line(out)
        assert "\n" not in line  # one point, one line: nothing a device sends can inject another
        assert line.startswith(out.device_type)


@settings(max_examples=300, deadline=None)
@given(fw=st.text(min_size=1, max_size=64), community=st.text(min_size=1, max_size=30))
def test_free_text_from_a_device_or_the_registry_stays_inside_its_line(fw: str, community: str) -> None:
    dev = Dev("d-x", "smoke_detector", community=community)
    dec = Decoder({"d-x": dev}.get, credential_key=b"k")
    payload = json.dumps({"online": True, "fw": fw}).encode()
    out = dec.decode(RawMessage("sc/v1/smoke_detector/d-x/status", payload, NOW))
    assert isinstance(out, Reading), out
    line = to_line(out)
    assert "\n" not in line and "\r" not in line.replace("\\r", "")
    assert line.endswith(f" {NOW}")

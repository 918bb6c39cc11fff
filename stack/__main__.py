"""`python -m stack up`: run the whole thing locally (broker, database, gateway, a simulated community).

`python -m stack packages` installs the Debian packages the stack needs.
Everything runs on 127.0.0.1 with its data under .var/; Ctrl-C stops what this started, in order.
The broker refuses anonymous clients: the gateway and the simulator get accounts of their own, made on
the first run and kept under .var/mosquitto/accounts/; the broker's admin is in .var/mosquitto/admin.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.broker_admin import ADAPTOR_ROLE
from stack.services import (
    REPO_ROOT,
    REQUIRED_PACKAGES,
    Service,
    StackError,
    ensure_debian_packages,
    free_port,
    start_influxdb,
    start_mosquitto,
    start_postgres,
)

VAR = REPO_ROOT / ".var"
SIMULATOR_ACCOUNT = "svc.simulator"


def _port(wanted: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return free_port()


def _metric(text: str, name: str, having: str = "") -> float:
    """Sum of a Prometheus metric's samples (optionally only those whose labels contain `having`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")) and having in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _installer_key(cli: list[str], env: dict[str, str]) -> str:
    """An installer API key for the person at the keyboard: made on the first run, kept 0600 in .var/."""
    path = VAR / "installer.key"
    if path.exists():
        return path.read_text().strip()
    out = subprocess.run(
        [*cli, "apikeys", "create", "--name", "local installer", "--role", "installer", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    key = str(json.loads(out)["key"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _manager_login(cli: list[str], env: dict[str, str], community: str) -> tuple[str, str]:
    """A property manager for the simulated community, to log in to the web page: made on the first run,
    the password kept 0600 in .var/."""
    import secrets

    username, path = "manager", VAR / "manager.password"
    if path.exists():
        return username, path.read_text().strip()
    password = secrets.token_urlsafe(12)
    subprocess.run(
        [
            *cli,
            "users",
            "create",
            username,
            "--role",
            "manager",
            "--community",
            community,
            "--password-stdin",
        ],
        env=env,
        input=password + "\n",
        check=True,
        capture_output=True,
        text=True,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return username, password


def _community_of(csv_path: Path) -> str:
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        return next(csv.DictReader(f))["community"]


def up(args: argparse.Namespace) -> int:
    py = sys.executable
    VAR.mkdir(exist_ok=True)
    services: list[Service] = []
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        mq_port, influx_port = _port(args.mqtt_port), _port(args.influx_port)
        print("==> starting Mosquitto and InfluxDB", flush=True)
        broker = start_mosquitto(VAR / "mosquitto", mq_port)
        services.append(broker)
        services.append(start_influxdb(VAR / "influxdb", influx_port))
        gateway_account = broker.gateway_account
        simulator_account = broker.account(SIMULATOR_ACCOUNT, ADAPTOR_ROLE)
        if args.postgres:
            print("==> starting PostgreSQL (registry, dead letters, device state)", flush=True)
            pg = start_postgres(VAR / "postgres", _port(args.postgres_port))
            services.append(pg)
            db_url = pg.dsn
        else:
            db_url = f"sqlite:///{VAR / 'registry.db'}"
        metrics_port = _port(args.metrics_port)
        env = dict(
            os.environ,
            SC_MQTT_PORT=str(mq_port),
            SC_MQTT_USERNAME=gateway_account.username,
            SC_MQTT_PASSWORD=gateway_account.password,
            SC_INFLUX_URL=f"http://127.0.0.1:{influx_port}",
            SC_DATABASE_URL=db_url,
            SC_SPOOL_DIR=str(VAR / "spool"),
            SC_METRICS_PORT=str(metrics_port),
            SC_WORKERS=str(args.workers),
        )
        cli = [py, "-m", "gateway.cli"]
        subprocess.run([*cli, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        csv_path = VAR / "community.csv"
        creds_path = VAR / "community-credentials.csv"
        own_credentials = False
        if not args.no_sim:
            print("==> registering a simulated community", flush=True)
            subprocess.run(
                [py, "-m", "simulators.community", "--seed", str(args.seed), "--out", str(csv_path)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            # Each device gets its own broker account (the installers' path); the simulator then connects
            # every device with its own credentials. Devices registered by an earlier run without a
            # credentials file fall back to the simulator's shared adaptor connections.
            import_cmd = [*cli, "devices", "import", str(csv_path)]
            if not creds_path.exists():
                import_cmd += ["--issue-credentials", str(creds_path)]
            subprocess.run(
                import_cmd,
                env=dict(env, SC_MQTT_ADMIN_FILE=str(VAR / "mosquitto" / "admin.json")),
                check=True,
            )
            own_credentials = _covers(creds_path, csv_path)
        print("==> starting the gateway", flush=True)
        gw_log = open(VAR / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the process
        procs.append(
            subprocess.Popen([*cli, "run"], env=env, stdout=gw_log, stderr=gw_log, start_new_session=True)
        )
        print("==> starting the API", flush=True)
        api_port = _port(args.api_port)
        api_key = _installer_key(cli, env)
        login = (
            ""
            if args.no_sim
            else "  log in as {} / {} (also in {})".format(
                *_manager_login(cli, env, _community_of(csv_path)), VAR / "manager.password"
            )
        )
        api_log = open(VAR / "api.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [*cli, "api", "--port", str(api_port)],
                env=dict(env, SC_MQTT_ADMIN_FILE=str(VAR / "mosquitto" / "admin.json")),
                stdout=api_log,
                stderr=api_log,
                start_new_session=True,
            )
        )
        if not args.no_sim:
            sim_log = open(VAR / "simulator.log", "ab")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        py,
                        "-m",
                        "simulators.run",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(mq_port),
                        "--devices-csv",
                        str(csv_path),
                        "--interval",
                        str(args.interval),
                        "--progress",
                        "30",
                        "--anomaly-scale",
                        str(args.anomaly_scale),
                        *(["--credentials-csv", str(creds_path)] if own_credentials else []),
                    ],
                    env=dict(
                        env,
                        SC_SIM_USERNAME=simulator_account.username,
                        SC_SIM_PASSWORD=simulator_account.password,
                    ),
                    stdout=sim_log,
                    stderr=sim_log,
                    start_new_session=True,
                )
            )
        influx_cli = f"influx -port {influx_port} -database sc"
        sim_desc = (
            "off"
            if args.no_sim
            else f"community of {csv_path} every ~{args.interval}s, "
            + ("each device on its own account" if own_credentials else "through the adaptor account")
        )
        print(
            f"""
Running (all on 127.0.0.1; data under {VAR}):
  Mosquitto  mqtt://127.0.0.1:{mq_port}          log {VAR / "mosquitto"}
  InfluxDB   http://127.0.0.1:{influx_port}      database "sc"
  Gateway    metrics http://127.0.0.1:{metrics_port}/metrics   log {VAR / "gateway.log"}
  Simulator  {sim_desc}   log {VAR / "simulator.log"}
  Web page   http://127.0.0.1:{api_port}/       the property managers' alert board{login}
  API        http://127.0.0.1:{api_port}/docs      log {VAR / "api.log"}
             installer key (also in {VAR / "installer.key"}): {api_key}

Look at it:
  {influx_cli} -execute 'SELECT * FROM streetlight ORDER BY time DESC LIMIT 5'
  SC_DATABASE_URL={db_url} .venv/bin/sc-gateway devices list
  SC_DATABASE_URL={db_url} .venv/bin/sc-gateway deadletters counts
  SC_DATABASE_URL={db_url} .venv/bin/sc-gateway alarms list --open
  SC_DATABASE_URL={db_url} .venv/bin/sc-gateway incidents list --commissioning
  curl -s -H "Authorization: Bearer $(cat {VAR / "installer.key"})" \\
      'http://127.0.0.1:{api_port}/api/v1/commissioning' | python3 -m json.tool | head -40
  mosquitto_sub -p {mq_port} -t 'sc/v1/#' -v -u {broker.admin_username} \\
      -P <the "password" in {VAR / "mosquitto" / "admin.json"}>
Ctrl-C stops everything.
""",
            flush=True,
        )
        last = time.monotonic()
        while not stopping:
            time.sleep(0.5)
            for p in procs:
                if p.poll() is not None and not stopping:
                    print(
                        f"!! {p.args[2] if isinstance(p.args, list) else p.args} exited with {p.returncode}; "
                        f"see the logs under {VAR}",
                        flush=True,
                    )
                    stopping = True
            if time.monotonic() - last >= args.report_s:
                last = time.monotonic()
                text = _scrape(metrics_port)
                if text:
                    stored = int(_metric(text, "sc_messages_total", 'outcome="stored"'))
                    rejected = int(_metric(text, "sc_rejects_total"))
                    spooled = int(_metric(text, "sc_spool_segments"))
                    print(
                        f"[{time.strftime('%H:%M:%S')}] messages stored {stored}, set aside {rejected}, "
                        f"spool segments {spooled}, {_incident_counts(db_url)}",
                        flush=True,
                    )
        return 0
    except (StackError, subprocess.CalledProcessError) as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 1
    finally:
        print("==> stopping", flush=True)
        for p in reversed(procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
        for s in reversed(services):
            s.stop()
        print("stopped", flush=True)


def _covers(creds_path: Path, csv_path: Path) -> bool:
    """Whether the credentials file has an account for every device of the community file."""
    import csv

    if not creds_path.exists():
        return False
    with open(creds_path, newline="", encoding="utf-8") as f:
        have = {row["device_id"] for row in csv.DictReader(f)}
    with open(csv_path, newline="", encoding="utf-8") as f:
        want = {row["device_id"] for row in csv.DictReader(f)}
    return bool(want) and want <= have


def _incident_counts(db_url: str) -> str:
    """ "incidents open N (M commissioning), resolved K" for the progress line."""
    from sqlalchemy import func, select

    from gateway.db import incidents, make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(incidents.c.status, incidents.c.commissioning, func.count()).group_by(
                    incidents.c.status, incidents.c.commissioning
                )
            ).all()
    except Exception as exc:  # the progress line must not stop the stack
        return f"incidents unknown ({exc.__class__.__name__})"
    finally:
        engine.dispose()
    count = {(st, bool(c)): int(n) for st, c, n in rows}
    live = count.get(("open", False), 0)
    noise = count.get(("open", True), 0)
    resolved = count.get(("resolved", False), 0) + count.get(("resolved", True), 0)
    return f"incidents open {live} (+{noise} commissioning), resolved {resolved}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("packages", help="install the Debian packages the stack needs")
    u = sub.add_parser("up", help="run broker, database, gateway and a simulated community")
    u.add_argument("--mqtt-port", type=int, default=1883)
    u.add_argument("--influx-port", type=int, default=8086)
    u.add_argument("--metrics-port", type=int, default=9108)
    u.add_argument("--api-port", type=int, default=8080)
    u.add_argument("--postgres", action="store_true", help="keep the registry in PostgreSQL, not SQLite")
    u.add_argument("--postgres-port", type=int, default=5433)
    u.add_argument("--workers", type=int, default=1)
    u.add_argument("--seed", type=int, default=1, help="simulated community seed")
    u.add_argument("--interval", type=float, default=5.0, help="seconds between a simulated device's reports")
    u.add_argument("--no-sim", action="store_true", help="no simulated community")
    u.add_argument(
        "--anomaly-scale",
        type=float,
        default=1000.0,
        help="multiply the simulator's rare-event rates (default 1000: a held-open door, a car in the "
        "fire lane or a tilted cover every few minutes, so incidents show soon; 1: a real day's rates)",
    )
    u.add_argument("--report-s", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.cmd == "packages":
        ensure_debian_packages(REQUIRED_PACKAGES)
        return 0
    return up(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""The status page and /metrics over a real coordinator: what it shows, to whom, and what it refuses."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from coldswarm.common.channel import bearer, open_channel
from coldswarm.coordinator import admin_cli
from coldswarm.coordinator.series import SeriesSource
from coldswarm.coordinator.server import start_server
from coldswarm.coordinator.status_http import MAX_BODY_BYTES, MAX_QUERY_BYTES
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

from . import status_scenario
from .conftest import make_config
from .status_scenario import wait_for
from .test_tls import self_signed

REPO = Path(__file__).resolve().parents[2]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
HTTP_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_model):
    s = status_scenario.build(tmp_path_factory.mktemp("status"), tiny_model, http_timeout_s=HTTP_TIMEOUT_S)
    yield s
    s.running.stop(grace=0)


class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all_text(self) -> str:
        return self.text + "\n" + "\n".join(f"{k}: {v}" for k, v in self.headers)


def request(url: str, path: str, method: str = "GET", headers=None, body=None, context=None) -> Reply:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def admin_headers(s) -> dict:
    return {"Authorization": f"Bearer {s.admin_token}"}


def login(s) -> tuple[Reply, str]:
    """Log in through the form as a browser does; returns the reply and the session cookie."""
    host = urllib.parse.urlsplit(s.url).netloc
    reply = request(
        s.url,
        "/login",
        "POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{host}"},
        body=urllib.parse.urlencode({"token": s.admin_token}),
    )
    cookie = reply.header("Set-Cookie") or ""
    return reply, cookie.split(";", 1)[0]


# -- what the page shows -------------------------------------------------------------------------


def test_json_and_html_name_every_version_and_its_state(scenario):
    versions = scenario.app.versions.list()
    data = request(scenario.url, "/api/status").json()
    assert [(v["number"], v["state"]) for v in data["versions"]] == [(v.number, v.state) for v in versions]
    assert {v["state"] for v in data["versions"]} == {"published", "rejected", "candidate"}
    assert [v["number"] for v in data["versions"] if v["is_current"]] == [2]
    assert [v["parent"] for v in data["versions"]] == [None, 0, 1, 2, 1]
    html = request(scenario.url, "/").text
    for v in versions:
        row = re.search(rf'<tr data-version="{v.number}"[^>]*>(.*?)</tr>', html, re.S)
        assert row is not None, f"no row for version {v.number}"
        assert f'<span class="badge s-{v.state}">{v.state}</span>' in row.group(1)
    # The metrics per version as charts: the headline charts carry every version, joined to its parent.
    charts = {c["id"]: c for c in data["lineage_charts"]}
    assert {"mod_loss", "exact_match", "token_loss"} <= set(charts)
    mean = next(line for line in charts["mod_loss"]["lines"] if line["metric"] == "mod_loss")
    assert [p["x"] for p in mean["points"]] == [0, 1, 2, 3, 4]
    assert [p["state"] for p in mean["points"]][3] == "rejected"
    assert [[a[0], b[0]] for a, b in mean["edges"]] == [[0, 1], [1, 2], [2, 3], [1, 4]]
    assert mean["points"][1]["y"] == pytest.approx((6.81 + 7.05 + 6.92) / 3)
    assert any(c["more"] and c["title"] == "swarm_loss" for c in data["lineage_charts"])


def test_the_finished_pretrain_rounds_curves_are_in_the_snapshot(scenario):
    data = request(scenario.url, "/api/status").json()
    series = data["series"]
    assert series["round"] == scenario.pretrain_round and series["state"] == "published"
    assert data["series_rounds"] == [scenario.pretrain_round]
    dht, beats = series["sources"][SeriesSource.DHT], series["sources"][SeriesSource.HEARTBEATS]
    assert len(dht["t"]) == 8 and len(beats["t"]) >= 8
    assert dht["loss"] == sorted(dht["loss"], reverse=True) and dht["loss"][0] == pytest.approx(9.1 - 0.33)
    assert beats["peers"][-1] == 2 and beats["samples_per_s"][-1] > 38  # two workers' rates summed
    assert all(t >= 0 for t in beats["t"]) and beats["t"] == sorted(beats["t"])
    assert request(scenario.url, f"/api/status?round={scenario.pretrain_round}").json()["series"] == series
    fusion = request(scenario.url, f"/api/status?round={scenario.pretrain_round + 1}")
    assert fusion.status == 404 and "not a pretrain round" in fusion.json()["error"]["message"]
    assert request(scenario.url, "/api/status?round=999").status == 404
    html = request(scenario.url, "/").text
    for canvas in ("curve-loss", "curve-samples_per_s", "curve-peers", "lineage-mod_loss"):
        assert f'id="{canvas}"' in html


def test_anonymous_view_hides_per_worker_rows_and_the_admin_view_shows_them(scenario):
    anon_json = request(scenario.url, "/api/status")
    anon_html = request(scenario.url, "/")
    data = anon_json.json()
    assert data["admin"] is False and data["workers"]["rows"] is None
    assert data["workers"]["active"] == 2 and data["workers"]["registered"] == 2
    assert data["workers"]["by_device"] == {"cpu": 2}
    assert data["workers"]["samples_per_s"] == 0  # both idle now: their last rates are history
    assert all(v["contributors"] is None for v in data["versions"])
    hidden = scenario.worker_ids + scenario.worker_names + ["ipv4:127.0.0.1"]
    for reply in (anon_json, anon_html):
        for secret in hidden:
            assert secret not in reply.text, f"{secret!r} shown to anyone"
    assert "worker-row" not in anon_html.text

    admin = request(scenario.url, "/api/status", headers=admin_headers(scenario)).json()
    rows = {r["id"]: r for r in admin["workers"]["rows"]}
    assert set(rows) == set(scenario.worker_ids)
    for wid, name, label in zip(scenario.worker_ids, scenario.worker_names, scenario.labels, strict=True):
        assert rows[wid]["name"] == name and rows[wid]["label"] == label
        assert rows[wid]["address"].startswith("ipv4:127.0.0.1:") and rows[wid]["device"] == "cpu"
        assert rows[wid]["contributions"] == 2
    assert set(admin["versions"][2]["contributors"]) == set(scenario.worker_ids)
    html = request(scenario.url, "/", headers=admin_headers(scenario)).text
    assert html.count('class="worker-row') == 2
    for secret in scenario.worker_ids + scenario.worker_names + scenario.labels:
        assert secret in html


def test_login_sets_an_http_only_session_cookie_and_logout_ends_it(scenario):
    reply, cookie = login(scenario)
    assert reply.status == 303 and reply.header("Location") == "/"
    attributes = reply.header("Set-Cookie").lower()
    assert "httponly" in attributes and "samesite=strict" in attributes and "secure" not in attributes
    page = request(scenario.url, "/", headers={"Cookie": cookie}).text
    assert "admin view" in page and scenario.worker_names[0] in page

    host = urllib.parse.urlsplit(scenario.url).netloc
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{host}"}
    wrong = request(scenario.url, "/login", "POST", headers=form, body="token=csa_not-the-token")
    assert wrong.status == 401 and "not this coordinator&#39;s admin token" in wrong.text
    assert wrong.header("Set-Cookie") is None
    join = next(t for t in scenario.tokens if t.startswith("csj_"))
    assert request(scenario.url, "/login", "POST", headers=form, body=f"token={join}").status == 401
    foreign = dict(form, Origin="http://evil.example")
    assert (
        request(scenario.url, "/login", "POST", headers=foreign, body=f"token={scenario.admin_token}").status
        == 403
    )
    bad_bearer = request(scenario.url, "/api/status", headers={"Authorization": "Bearer csa_nope"})
    assert bad_bearer.status == 401 and "admin token" in bad_bearer.json()["error"]["message"]

    out = request(scenario.url, "/logout", "POST", headers={"Cookie": cookie, "Origin": f"http://{host}"})
    assert out.status == 303
    assert "admin view" not in request(scenario.url, "/", headers={"Cookie": cookie}).text


def test_no_response_contains_a_token(scenario):
    _reply, cookie = login(scenario)
    replies = [_reply]
    for headers in ({}, admin_headers(scenario), {"Cookie": cookie}):
        for path in ("/", "/api/status", f"/api/status?round={scenario.pretrain_round}", "/metrics", "/nope"):
            replies.append(request(scenario.url, path, headers=headers))
    host = urllib.parse.urlsplit(scenario.url).netloc
    replies.append(
        request(
            scenario.url,
            "/login",
            "POST",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{host}"},
            body=f"token={scenario.admin_token[:-2]}xx",
        )
    )
    assert len(scenario.tokens) == 5  # admin, two join tokens, two worker sessions
    for reply in replies:
        text = reply.all_text()
        for token in scenario.tokens:
            assert token not in text
            assert token[4:20] not in text  # not even a piece of one
        assert "admin.token" not in text and "Traceback" not in text


def documented_metrics() -> set[str]:
    guide = (REPO / "coordinator" / "README.md").read_text()
    section = guide.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(coldswarm_[a-z_]+)`", section, re.M))


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_with_the_prometheus_parser_and_carry_the_documented_names(scenario):
    # A download through the service, so the byte counter has something to count.
    with open_channel(scenario.running.address) as channel:
        stub = pb_grpc.AdminServiceStub(channel)
        chunks = stub.DownloadVersion(
            pb.DownloadRequest(version="0", path="config.json"), metadata=bearer(scenario.admin_token)
        )
        downloaded = sum(len(c.data) for c in chunks)
    assert request(scenario.url, "/").status == 200
    reply = request(scenario.url, "/metrics")
    assert reply.status == 200 and reply.header("Content-Type").startswith("text/plain; version=0.0.4")
    found = families(reply.text)
    documented = {name.removesuffix("_total") for name in documented_metrics()}
    assert len(documented) >= 20
    assert documented == {n for n in found if n.startswith("coldswarm_")}, "README and /metrics disagree"

    def value(family: str, **labels) -> float:
        for sample in found[family].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()) and not sample.name.endswith(
                ("_created", "_bucket")
            ):
                return sample.value
        raise KeyError(f"{family} {labels}")

    assert value("coldswarm_versions", state="rejected") == 1
    assert value("coldswarm_versions", state="candidate") == 1
    assert value("coldswarm_versions", state="published") == 3
    assert value("coldswarm_published_version") == 2
    assert value("coldswarm_rounds", kind="pretrain", state="published") == 1
    assert value("coldswarm_rounds", kind="fusion", state="rejected") == 1
    assert value("coldswarm_contributions", state="merged") == 4
    assert value("coldswarm_active_workers") == 2 and value("coldswarm_registered_workers") == 2
    assert value("coldswarm_heartbeats") >= 20  # 16 while training, 4 idle
    count = next(s.value for s in found["coldswarm_heartbeat_seconds"].samples if s.name.endswith("_count"))
    assert count == value("coldswarm_heartbeats")
    assert value("coldswarm_upload_bytes") > 0
    assert value("coldswarm_download_bytes") >= downloaded > 0
    merges = next(s.value for s in found["coldswarm_merge_seconds"].samples if s.name.endswith("_count"))
    evals = next(s.value for s in found["coldswarm_evaluation_seconds"].samples if s.name.endswith("_count"))
    assert merges == 3 and evals >= 4  # rounds 2, 3 and the re-merge; versions 1-4 (0 before the metrics)
    assert value("coldswarm_rpcs", method="coldswarm.v1.WorkerService/Register", code="OK") == 2
    assert value("coldswarm_http_requests", route="/", status="200") >= 1
    assert found["coldswarm_swarm_loss"].samples == []  # no live pretrain round


def test_the_live_pretrain_rounds_swarm_is_in_metrics(make_harness):
    h = make_harness(http_listen="127.0.0.1:0", series_interval_s=0)
    rnd = h.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=h.amd)
    h.app.series.record(rnd.id, SeriesSource.DHT, {"loss": 5.5, "samples_per_s": 40.0, "peers": 3.0})
    found = families(request(h.running.status_url, "/metrics").text)
    assert [(s.labels, s.value) for s in found["coldswarm_swarm_loss"].samples] == [({"source": "dht"}, 5.5)]
    assert found["coldswarm_swarm_peers"].samples[0].value == 3
    assert found["coldswarm_swarm_samples_per_second"].samples[0].value == 40
    assert found["coldswarm_live_round"].samples[0].value == rnd.id
    live = request(h.running.status_url, "/api/status").json()["live_round"]
    assert live["kind"] == "pretrain" and live["swarm"]["dht"]["loss"] == 5.5


# -- what it refuses ------------------------------------------------------------------------------


def raw(url: str, data: bytes, timeout: float = 30.0) -> bytes:
    """Send ``data`` as is and read until the server closes or answers."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and len(out) > 4096:
                break
        return out


def health(scenario) -> int:
    with open_channel(scenario.running.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_bad_requests_get_4xx_with_a_message_and_grpc_stays_serving(scenario):
    url = scenario.url
    long_query = "round=" + "1" * (MAX_QUERY_BYTES + 10)
    cases = [
        (request(url, "/no/such/page"), 404, "no page at"),
        (request(url, "/api/nothing"), 404, "no page at"),
        (request(url, "/static/../../etc/passwd"), 404, ""),
        (request(url, "/static/secret.py"), 404, "no file"),
        (request(url, "/", "POST"), 405, "not allowed"),
        (request(url, "/metrics", "DELETE"), 405, "not allowed"),
        (request(url, "/login"), 405, "not allowed"),
        (request(url, f"/?{long_query}"), 414, "query string too long"),
        (request(url, "/?" + "a=1&" * 3000), 400, "Got more than 8190 bytes"),  # aiohttp's line limit
        (request(url, "/?verbose=1"), 400, "unknown query parameter 'verbose'"),
        (request(url, "/metrics?x=1"), 400, "this path takes none"),
        (request(url, "/?round=-1"), 400, "round number"),
        (request(url, "/", headers={"X-Big": "x" * 9000}), 400, "Got more than 8190 bytes"),
        (request(url, "/", headers={f"X-H{i}": "1" for i in range(100)}), 400, "many headers"),
        (
            request(url, "/login", "POST", headers=FORM, body=b"token=" + b"x" * (MAX_BODY_BYTES + 1)),
            413,
            "too large",
        ),
        (request(url, "/login", "POST", body=b'{"token": "x"}'), 415, "x-www-form-urlencoded"),
    ]
    for reply, status, message in cases:
        assert reply.status == status, (status, reply.status, reply.text[:200])
        assert message in reply.text, (message, reply.text[:200])
        assert "Traceback" not in reply.text and 'File "' not in reply.text
    assert request(url, "/", "POST").header("Allow") == "GET, HEAD"
    garbage = raw(url, b"\x16\x03\x01\x02\x00hello, not http\r\n\r\n")
    assert garbage.split(b" ", 2)[1] == b"400" and b"HTTPS traffic on an HTTP port" in garbage, garbage[:200]
    nonsense = raw(url, b"HELLO?\r\n\r\n")
    assert nonsense.split(b" ", 2)[1] == b"400", nonsense[:200]
    assert health(scenario) == health_pb2.HealthCheckResponse.SERVING


def test_slow_clients_are_cut_off_and_the_service_stays_healthy(scenario):
    parts = urllib.parse.urlsplit(scenario.url)
    began = time.monotonic()
    # Headers that never end (slowloris): aiohttp closes the connection at --http-timeout-s.
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.monotonic() - began < HTTP_TIMEOUT_S * 10:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
        assert closed, "a client trickling headers kept its connection"
    assert time.monotonic() - began < HTTP_TIMEOUT_S * 10
    # A form body that never arrives: 408 after the same timeout.
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100\r\n\r\ntoken="
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive" in answer
    assert health(scenario) == health_pb2.HealthCheckResponse.SERVING
    assert request(scenario.url, "/").status == 200


def test_connections_past_the_cap_get_a_503(scenario, monkeypatch):
    from coldswarm.coordinator import status_http

    monkeypatch.setattr(status_http, "MAX_CONNECTIONS", 3)
    parts = urllib.parse.urlsplit(scenario.url)
    held = []
    try:
        for _ in range(3):  # answered, then left open (keep-alive): the server holds each
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", "/static/status.css")
            assert conn.getresponse().read()
            held.append(conn)
        answer = raw(scenario.url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer, answer[:200]
    finally:
        for conn in held:
            conn.close()
    monkeypatch.undo()
    wait_for(lambda: request(scenario.url, "/").status == 200, what="the page again")
    assert health(scenario) == health_pb2.HealthCheckResponse.SERVING


def test_the_status_page_serves_tls_with_the_coordinators_certificate(tmp_path, tiny_model):
    cert, key = self_signed(tmp_path)
    config = make_config(tmp_path / "data", tiny_model, tls_cert=cert, tls_key=key, http_listen="127.0.0.1:0")
    running = start_server(config)
    try:
        url = running.status_url
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        reply = request(url, "/api/status", context=context)
        assert reply.status == 200 and reply.json()["versions"][0]["number"] == 0
        assert "max-age" in reply.header("Strict-Transport-Security")
        token = config.admin_token_path.read_text().strip()
        host = urllib.parse.urlsplit(url).netloc
        login_reply = request(
            url,
            "/login",
            "POST",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": f"https://{host}"},
            body=f"token={token}",
            context=context,
        )
        assert login_reply.status == 303 and "secure" in login_reply.header("Set-Cookie").lower()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(url, "/", context=ssl.create_default_context())  # an untrusted certificate
        assert (
            raw(url.replace("https", "http"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)[:4] != b"HTTP"
        )
    finally:
        running.stop(grace=0)


def test_off_unless_asked(harness):
    assert harness.running.status is None and harness.running.status_url == ""


# -- durability, and the same chart as a file ----------------------------------------------------


def test_curves_survive_a_restart(tmp_path, tiny_model):
    config = make_config(tmp_path / "data", tiny_model, http_listen="127.0.0.1:0", series_interval_s=0)
    running = start_server(config)
    try:
        token = config.admin_token_path.read_text().strip()
        with open_channel(running.address) as channel:
            rnd = pb_grpc.AdminServiceStub(channel).OpenRound(
                pb.OpenRoundRequest(kind="pretrain"), metadata=bearer(token)
            )
        for i in range(5):
            assert running.app.series.record(rnd.id, SeriesSource.DHT, {"loss": 9.0 - i}, t=time.time() + i)
        before = request(running.status_url, "/api/status").json()["series"]
    finally:
        running.stop(grace=0)
    running = start_server(config)
    try:
        after = request(running.status_url, "/api/status").json()["series"]
        assert after["sources"] == before["sources"] and after["sources"]["dht"]["loss"] == [9, 8, 7, 6, 5]
    finally:
        running.stop(grace=0)


def test_admin_plot_writes_the_lineage_chart_as_png(scenario, tmp_path, capsys):
    out = tmp_path / "lineage.png"
    argv = [
        "--coordinator",
        scenario.running.address,
        "--token",
        scenario.admin_token,
        "plot",
        "--out",
        str(out),
    ]
    assert admin_cli.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import image

    height, width = image.imread(out).shape[:2]
    assert width >= 800 and height >= 300
    assert "5 versions" in capsys.readouterr().out
    bad = ["--coordinator", scenario.running.address, "--token", "csa_bad", "plot", "--out", str(out)]
    assert admin_cli.main(bad) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err

"""``coldswarm-admin``: administer a running coordinator.

    coldswarm-admin [--coordinator HOST:PORT] [--token T] [--ca-file F] [--json] SUBCOMMAND

    status | workers [--all] | versions | rounds | contributions [--round N]
    tokens create [--label L] | tokens revoke ID | tokens list
    round open --kind fusion|pretrain [--base-version V] [--quorum N] [--deadline S] [--method M] [--options JSON]
    round close [--round N] [--cancel]
    merge [--round N] [--method NAME] [--options JSON]
    publish VERSION | rollback VERSION
    download VERSION|latest --out DIR
    plot --out FILE.png

The admin token comes from --token, --token-file, COLDSWARM_ADMIN_TOKEN or
COLDSWARM_TOKEN (in that order); the coordinator wrote it to
``<data-dir>/admin.token`` at first start. Every subcommand prints a table (or
JSON with --json) and exits non-zero, with a message saying what to do, on any
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from coldswarm.common.channel import bearer, open_channel
from coldswarm.common.fetch import DownloadError, download_version
from coldswarm.coordinator.states import ROUND_KINDS
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

DEFAULT_COORDINATOR = "127.0.0.1:50051"


class CliError(Exception):
    """A failure with a message for the person at the terminal."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coldswarm-admin",
        description="Administer a coldswarm coordinator.",
        epilog="Token: --token, --token-file, or COLDSWARM_ADMIN_TOKEN / COLDSWARM_TOKEN.",
    )
    p.add_argument(
        "--coordinator",
        default=os.environ.get("COLDSWARM_COORDINATOR", DEFAULT_COORDINATOR),
        help=f"HOST:PORT of the coordinator (env COLDSWARM_COORDINATOR; default {DEFAULT_COORDINATOR})",
    )
    p.add_argument("--token", default=None, help="the admin token")
    p.add_argument("--token-file", type=Path, default=None, help="a file holding the admin token")
    p.add_argument(
        "--ca-file",
        type=Path,
        default=os.environ.get("COLDSWARM_CA_FILE") or None,
        help="PEM of the CA that signed the coordinator's TLS cert (turns on TLS; env COLDSWARM_CA_FILE)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the coordinator at a glance")
    w = sub.add_parser("workers", help="registered workers")
    w.add_argument("--all", action="store_true", help="include workers that left or went silent")
    sub.add_parser("versions", help="all versions; * marks the published one")
    sub.add_parser("rounds", help="all rounds")
    c = sub.add_parser("contributions", help="contributions, of one round or all")
    c.add_argument("--round", type=int, default=None)
    t = sub.add_parser("tokens", help="join tokens")
    tsub = t.add_subparsers(dest="tokens_command", required=True)
    tc = tsub.add_parser("create", help="mint a join token (shown once)")
    tc.add_argument("--label", default="", help="a note for you, e.g. who gets it")
    tr = tsub.add_parser("revoke", help="revoke a join token (its workers are cut off)")
    tr.add_argument("id")
    tsub.add_parser("list", help="all tokens (ids and labels; never the tokens)")
    r = sub.add_parser("round", help="open or close a round")
    rsub = r.add_subparsers(dest="round_command", required=True)
    ro = rsub.add_parser("open", help="open a round on the published version")
    ro.add_argument("--kind", required=True, choices=list(ROUND_KINDS))
    ro.add_argument("--base-version", type=int, default=None, help="default: the published version")
    ro.add_argument("--quorum", type=int, default=0, help="contributions that close the round")
    ro.add_argument("--deadline", type=float, default=0.0, help="seconds from now until the round closes")
    ro.add_argument("--method", default="", help="merge method (fusion rounds)")
    ro.add_argument("--options", default="", help="JSON: peft_method, hyperparameters, codec, merge, ...")
    rc = rsub.add_parser("close", help="close the open round (it then merges)")
    rc.add_argument("--round", type=int, default=None, help="default: the open round")
    rc.add_argument("--cancel", action="store_true", help="close without merging")
    m = sub.add_parser("merge", help="re-merge a finished round into a candidate version")
    m.add_argument("--round", type=int, default=0, help="default: the latest finished fusion round")
    m.add_argument("--method", default="", help="default: the round's method")
    m.add_argument("--options", default="", help="JSON options for the method")
    pu = sub.add_parser("publish", help="move the published pointer to VERSION")
    pu.add_argument("version", type=int)
    rb = sub.add_parser("rollback", help="move the published pointer back to VERSION (deletes nothing)")
    rb.add_argument("version", type=int)
    d = sub.add_parser("download", help="download a version into an HF directory (resumable, verified)")
    d.add_argument("version", help="a number or 'latest'")
    d.add_argument("--out", type=Path, required=True)
    pl = sub.add_parser(
        "plot", help="the lineage chart (metrics per version, joined to parents) as a PNG, as the status page"
    )
    pl.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    return p


def resolve_token(args) -> str:
    if args.token:
        return args.token.strip()
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file {args.token_file}: {exc}") from None
    for var in ("COLDSWARM_ADMIN_TOKEN", "COLDSWARM_TOKEN"):
        if os.environ.get(var):
            return os.environ[var].strip()
    raise CliError(
        "no admin token: pass --token or --token-file, or set COLDSWARM_ADMIN_TOKEN "
        "(the coordinator wrote it to <data-dir>/admin.token at first start)"
    )


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [["-" if v is None or v == "" else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def render(args, msg) -> str:
    """A human rendering of a response message."""
    if isinstance(msg, pb.StatusResponse):
        lines = [
            f"coordinator  {args.coordinator} (coldswarm {msg.coordinator_version}, up {msg.uptime_s:.0f}s)",
            f"published    version {_opt(msg, 'current_version')} of {msg.versions}",
            f"workers      {msg.workers_active} active / {msg.workers_total} registered",
        ]
        if msg.HasField("open_round"):
            r = msg.open_round
            lines.append(
                f"round        {r.id} ({r.kind}, {r.state}) on version {r.base_version}: "
                f"{r.contributions}/{r.quorum} contributions, deadline {_when(r.deadline)}"
            )
        else:
            lines.append("round        none open")
        return "\n".join(lines)
    if isinstance(msg, pb.ListWorkersResponse):
        return table(
            [
                [
                    w.id,
                    w.name,
                    w.state,
                    w.capabilities.device,
                    w.assignment_id,
                    _when(w.last_seen),
                    f"{w.swarm_samples} in {w.swarm_rounds}" if w.swarm_rounds else "",
                ]
                for w in msg.workers
            ],
            ["ID", "NAME", "STATE", "DEVICE", "ASSIGNMENT", "LAST SEEN", "PRETRAIN SAMPLES (ROUNDS)"],
        )
    if isinstance(msg, pb.ListVersionsResponse):
        return table([_version_row(v) for v in msg.versions], _VERSION_HEADERS)
    if isinstance(msg, pb.Version):
        return table([_version_row(v=msg)], _VERSION_HEADERS)
    if isinstance(msg, pb.ListRoundsResponse):
        return table([_round_row(r) for r in msg.rounds], _ROUND_HEADERS)
    if isinstance(msg, pb.Round):
        return table([_round_row(msg)], _ROUND_HEADERS)
    if isinstance(msg, pb.ListContributionsResponse):
        return table(
            [
                [
                    c.id,
                    c.round_id,
                    c.worker_id,
                    c.base_version,
                    c.form,
                    c.size,
                    c.num_examples,
                    c.state,
                    c.sha256[:12],
                ]
                for c in msg.contributions
            ],
            ["ID", "ROUND", "WORKER", "BASE", "FORM", "BYTES", "EXAMPLES", "STATE", "SHA256"],
        )
    if isinstance(msg, pb.ListTokensResponse):
        return table(
            [[t.id, t.kind, t.label, _when(t.created_at), "yes" if t.revoked else "no"] for t in msg.tokens],
            ["ID", "KIND", "LABEL", "CREATED", "REVOKED"],
        )
    if isinstance(msg, pb.CreateTokenResponse):
        return (
            f"join token {msg.info.id} ({msg.info.label or 'no label'}); shown once, keep it:\n{msg.token}\n"
            f"workers join with: join-swarm --coordinator {args.coordinator} --token {msg.token}"
        )
    if isinstance(msg, pb.RevokeTokenResponse):
        return f"token {msg.info.id} revoked; workers that joined with it are cut off"
    return str(msg)


_VERSION_HEADERS = ["", "VERSION", "PARENT", "ROUND", "METHOD", "STATE", "FILES", "BYTES", "CREATED", "GATE"]
_ROUND_HEADERS = [
    "ID",
    "KIND",
    "STATE",
    "BASE",
    "CONTRIB",
    "QUORUM",
    "METHOD",
    "RESULT",
    "DEADLINE",
    "SWARM",
    "ERROR",
]


def _version_row(v) -> list:
    return [
        "*" if v.is_current else " ",
        v.number,
        _opt(v, "parent"),
        _opt(v, "round_id"),
        v.method,
        v.state,
        len(v.files),
        sum(f.size for f in v.files),
        _when(v.created_at),
        _gate(v.manifest_json),
    ]


def _gate(manifest_json: str) -> str:
    """The publication gate's verdict on a version, from its manifest."""
    from coldswarm.coordinator.publication_gate import summary

    try:
        manifest = json.loads(manifest_json or "{}")
    except ValueError:
        return "-"
    return summary(manifest.get("gate") if isinstance(manifest, dict) else None)


def _round_row(r) -> list:
    return [
        r.id,
        r.kind,
        r.state,
        r.base_version,
        r.contributions,
        r.quorum,
        r.method,
        _opt(r, "result_version"),
        _when(r.deadline),
        _swarm(r),
        r.error,
    ]


#: the most pages a listing follows (at up to 1,000 items each); a coordinator that keeps sending more is broken
MAX_PAGES = 10_000


def list_all(call, request, field: str, timeout: float):
    """Every item of a paged listing (AIP-158): follow ``next_page_token`` until the last page, and return
    one response holding them all (so ``--json`` prints one document)."""
    merged = type(request).__name__.replace("Request", "Response")
    out = getattr(pb, merged)()
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = call(request, timeout=timeout)
        getattr(out, field).extend(getattr(page, field))
        if not page.next_page_token:
            return out
        if page.next_page_token in seen:
            raise CliError("the coordinator sent the same page token twice; the listing is incomplete")
        seen.add(page.next_page_token)
        request.page_token = page.next_page_token
    raise CliError(f"the listing did not end after {MAX_PAGES} pages")


def _swarm(r) -> str:
    """A collected pretrain round's admitted participants: ``w-1a2b:1024 w-3c4d:980`` (worker: samples)."""
    return " ".join(f"{p.worker_id}:{p.samples}" for p in r.swarm_participants)


def run(args, stub, md) -> object:
    """Do the subcommand; returns a message to print (or a dict for download)."""
    t = args.timeout
    cmd = args.command

    def listing(method: str, request, field: str):
        call = getattr(stub, method)
        return list_all(lambda r, timeout: call(r, metadata=md, timeout=timeout), request, field, t)

    if cmd == "status":
        return stub.Status(pb.StatusRequest(), metadata=md, timeout=t)
    if cmd == "workers":
        return listing("ListWorkers", pb.ListWorkersRequest(include_gone=args.all), "workers")
    if cmd == "versions":
        return listing("ListVersions", pb.ListVersionsRequest(), "versions")
    if cmd == "rounds":
        return listing("ListRounds", pb.ListRoundsRequest(), "rounds")
    if cmd == "contributions":
        req = pb.ListContributionsRequest()
        if args.round is not None:
            req.round_id = args.round
        return listing("ListContributions", req, "contributions")
    if cmd == "tokens":
        if args.tokens_command == "create":
            return stub.CreateToken(pb.CreateTokenRequest(label=args.label), metadata=md, timeout=t)
        if args.tokens_command == "revoke":
            return stub.RevokeToken(pb.RevokeTokenRequest(id=args.id), metadata=md, timeout=t)
        return listing("ListTokens", pb.ListTokensRequest(), "tokens")
    if cmd == "round":
        if args.round_command == "open":
            req = pb.OpenRoundRequest(
                kind=args.kind,
                quorum=args.quorum,
                deadline_s=args.deadline,
                method=args.method,
                options_json=args.options,
            )
            if args.base_version is not None:
                req.base_version = args.base_version
            return stub.OpenRound(req, metadata=md, timeout=t)
        req = pb.CloseRoundRequest(cancel=args.cancel)
        if args.round is not None:
            req.round_id = args.round
        return stub.CloseRound(req, metadata=md, timeout=t)
    if cmd == "merge":
        req = pb.MergeRequest(round_id=args.round, method=args.method, options_json=args.options)
        # A merge runs while this waits: give it longer than a listing.
        return stub.Merge(req, metadata=md, timeout=max(t, 3600.0))
    if cmd == "publish":
        return stub.Publish(pb.PublishRequest(version=args.version), metadata=md, timeout=t)
    if cmd == "rollback":
        return stub.Rollback(pb.RollbackRequest(version=args.version), metadata=md, timeout=t)
    if cmd == "plot":
        return plot(args, listing("ListVersions", pb.ListVersionsRequest(), "versions"))
    if cmd == "download":
        report = download_version(stub, args.version, args.out, metadata=md)
        return {
            "version": report.version,
            "out": str(args.out),
            "files": report.files,
            "bytes_fetched": report.bytes_fetched,
            "bytes_reused": report.bytes_reused,
        }
    raise CliError(f"unknown command {cmd}")


def plot(args, listing: pb.ListVersionsResponse) -> dict:
    """Draw the listed versions' lineage chart into ``args.out`` (coordinator/lineage_plot.py)."""
    from coldswarm.coordinator import lineage
    from coldswarm.coordinator.lineage_plot import write_png

    entries = [lineage.from_version(v) for v in listing.versions]
    current = next((e.number for e in entries if e.is_current), None)
    try:
        charts = write_png(
            entries,
            args.out,
            title=f"coldswarm at {args.coordinator}: {len(entries)} versions, {current} published",
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return {"plot": str(args.out), "versions": len(entries), "charts": charts}


def explain(exc: grpc.RpcError, args) -> str:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the coordinator at {args.coordinator} ({details}): is `coldswarm-coordinator "
            "serve` running there? Use --coordinator HOST:PORT, and --ca-file if it serves TLS"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the coordinator at {args.coordinator} did not answer within {args.timeout}s (--timeout)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{details}. Check --token / COLDSWARM_ADMIN_TOKEN"
    return details or code.name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --json is global but also accepted after the subcommand (`coldswarm-admin status --json`).
    as_json = "--json" in argv
    args = parser.parse_args([a for a in argv if a != "--json"])
    args.json = as_json
    try:
        token = resolve_token(args)
        try:
            channel = open_channel(args.coordinator, args.ca_file)
        except OSError as exc:
            raise CliError(f"cannot read the CA file {args.ca_file}: {exc}") from None
        with channel:
            result = run(args, pb_grpc.AdminServiceStub(channel), bearer(token))
    except grpc.RpcError as exc:
        return _failed(args, exc.code().name, explain(exc, args))
    except (CliError, DownloadError, OSError) as exc:
        return _failed(args, "ERROR", str(exc))
    if args.json:
        data = result if isinstance(result, dict) else MessageToDict(result, preserving_proto_field_name=True)
        if isinstance(result, pb.ListVersionsResponse):
            data = _with_lineage(result, data)
        print(json.dumps(data, indent=2, sort_keys=True))
    elif isinstance(result, dict) and "plot" in result:
        print(
            f"lineage chart of {result['versions']} versions ({result['charts']} charts) written to {result['plot']}"
        )
    elif isinstance(result, dict):
        print(
            f"version {result['version']} in {result['out']}: {result['files']} files verified "
            f"({result['bytes_fetched']} bytes fetched, {result['bytes_reused']} already there)"
        )
    else:
        print(render(args, result))
    return 0


def _with_lineage(listing: pb.ListVersionsResponse, data: dict) -> dict:
    """``--json versions``: each version as the wire has it (files, manifest_json) plus its lineage fields
    (kind, state, flat metrics, gate: the document ``coldswarm-local`` writes as ``versions.json``)."""
    from coldswarm.coordinator import lineage

    entries = lineage.document(listing.versions)["versions"]
    return {
        "versions": [{**wire, **entry} for wire, entry in zip(data.get("versions", []), entries, strict=True)]
    }


def _failed(args, code: str, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    print(f"coldswarm-admin: {code}: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

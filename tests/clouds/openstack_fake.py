"""A small in-memory Nova + Neutron (+ the few Glance calls a server image needs) behind requests-mock, for the
compute tests and the build flow test, or over real HTTP on 127.0.0.1 (`served`) when another process (a killed
`kiln build`, then `kiln gc`) must reach the same state. It keeps what it was asked to create, so a test can
assert the exact calls made and that nothing is left afterwards. Hooks let the flow test back servers with local
QEMU guests."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests_mock

COMPUTE_VERSION = {"id": "v2.1", "status": "CURRENT", "version": "2.90", "min_version": "2.1"}


@dataclass
class FakeServer:
    id: str
    body: dict[str, Any]
    status: str = "BUILD"
    polls: int = 0  # GETs seen while BUILD; ACTIVE after `build_polls`
    console: str = ""


@dataclass
class FakeOpenStack:
    """State of the fake cloud; `calls` lists (METHOD, path) in order, the way tests assert on them."""

    compute_url: str
    network_url: str
    image_url: str | None = None  # None: Glance is real and not faked here
    flavors: list[dict[str, Any]] = field(default_factory=lambda: [{"id": "f-small", "name": "m1.small"}])
    networks: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"id": "net-private", "name": "private", "router:external": False},
            {"id": "net-public", "name": "public", "router:external": True},
        ]
    )
    build_polls: int = 1
    fail_boot: bool = False  # servers go to ERROR instead of ACTIVE
    image_final_status: str = "active"  # what a server image becomes after queued
    servers: dict[str, FakeServer] = field(default_factory=dict)
    keypairs: dict[str, dict[str, Any]] = field(default_factory=dict)
    security_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    floating_ips: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[tuple[str, str, Any]] = field(default_factory=list)
    on_server_created: Callable[[FakeServer], None] | None = None
    on_server_stopped: Callable[[FakeServer], None] | None = None
    on_server_deleted: Callable[[FakeServer], None] | None = None
    on_create_image: Callable[[FakeServer, str, dict[str, str]], str] | None = None  # returns the image id
    console_for: Callable[[FakeServer], str] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- wiring ------------------------------------------------------------------------------------------

    def register(self, mocker: requests_mock.Mocker) -> None:
        for base in filter(None, (self.compute_url, self.network_url, self.image_url)):
            host = re.escape(base.split("://", 1)[1].split("/", 1)[0])
            mocker.register_uri(requests_mock.ANY, re.compile(rf"https?://{host}(/.*)?$"), json=self._dispatch)

    def leftovers(self) -> dict[str, list[str]]:
        """Everything the fake still holds that kiln created: empty after a clean run."""
        return {
            kind: sorted(items)
            for kind, items in {
                "servers": self.servers,
                "keypairs": self.keypairs,
                "security_groups": self.security_groups,
                "floating_ips": self.floating_ips,
                "images": self.images,
            }.items()
            if items
        }

    def calls_matching(self, method: str, pattern: str) -> list[str]:
        return [path for m, path in self.calls if m == method and re.fullmatch(pattern, path)]

    # -- dispatch ----------------------------------------------------------------------------------------

    def _dispatch(self, request: Any, context: Any) -> Any:
        with self.lock:
            path = request.path_url.split("?", 1)[0]
            for base, prefix in ((self.compute_url, "compute"), (self.network_url, "network"),
                                 (self.image_url, "image")):
                if base and request.netloc == base.split("://", 1)[1].split("/", 1)[0]:
                    return self._route(prefix, request, context, path)
            context.status_code = 404
            return {"error": f"no fake for {request.url}"}

    def _route(self, service: str, request: Any, context: Any, path: str) -> Any:
        method = request.method
        body = request.json() if request.body and request.headers.get("Content-Type", "").startswith(
            "application/json") else None
        query = {k: v[0] for k, v in request.qs.items()}
        self.calls.append((method, f"{service}:{path}"))
        self.bodies.append((method, f"{service}:{path}", body))
        handler = getattr(self, f"_{service}")
        result = handler(method, path.rstrip("/"), body, query, context, request)
        return result

    @staticmethod
    def _missing(context: Any, what: str) -> dict[str, Any]:
        context.status_code = 404
        return {"itemNotFound": {"code": 404, "message": f"{what} could not be found."}}

    # -- Nova --------------------------------------------------------------------------------------------

    def _compute(self, method: str, path: str, body: Any, query: dict, context: Any, request: Any) -> Any:
        path = re.sub(r"^/v2\.1", "", path)
        if path == "" and method == "GET":
            return {"version": {**COMPUTE_VERSION, "links": [{"rel": "self", "href": self.compute_url}]}}
        if path == "/flavors/detail":
            return {"flavors": [self._flavor(f) for f in self.flavors]}
        if match := re.fullmatch(r"/flavors/([^/]+)", path):
            flavor = next((f for f in self.flavors if f["id"] == match[1]), None)
            return {"flavor": self._flavor(flavor)} if flavor else self._missing(context, "Flavor")
        if path == "/os-keypairs" and method == "POST":
            pair = {"name": body["keypair"]["name"], "public_key": body["keypair"]["public_key"],
                    "fingerprint": "fake", "type": "ssh", "user_id": "u"}
            self.keypairs[pair["name"]] = pair
            return {"keypair": pair}
        if path == "/os-keypairs" and method == "GET":
            return {"keypairs": [{"keypair": pair} for pair in self.keypairs.values()]}
        if match := re.fullmatch(r"/os-keypairs/([^/]+)", path):
            if method == "DELETE":
                if self.keypairs.pop(match[1], None) is None:
                    return self._missing(context, "Keypair")
                context.status_code = 202
                return {}
            pair = self.keypairs.get(match[1])
            return {"keypair": pair} if pair else self._missing(context, "Keypair")
        if path == "/servers" and method == "POST":
            return self._create_server(body["server"], context)
        if path == "/servers/detail":
            return {"servers": [self._server_view(s) for s in self.servers.values()]}
        if match := re.fullmatch(r"/servers/([^/]+)/action", path):
            return self._server_action(match[1], body, context)
        if match := re.fullmatch(r"/servers/([^/]+)", path):
            server = self.servers.get(match[1])
            if server is None:
                return self._missing(context, "Server")
            if method == "DELETE":
                self._delete_server(server)
                context.status_code = 204
                return {}
            if server.status == "BUILD":
                server.polls += 1
                if server.polls >= self.build_polls:
                    server.status = "ERROR" if self.fail_boot else "ACTIVE"
            return {"server": self._server_view(server)}
        if path == "/servers" and method == "GET":
            return {"servers": [{"id": s.id, "name": s.body["name"]} for s in self.servers.values()]}
        context.status_code = 404
        return {"error": f"fake Nova has no {method} {path}"}

    @staticmethod
    def _flavor(flavor: dict[str, Any]) -> dict[str, Any]:
        return {"vcpus": 1, "ram": 1024, "disk": 10, **flavor, "os-flavor-access:is_public": True}

    def _create_server(self, spec: dict[str, Any], context: Any) -> Any:
        server = FakeServer(id=str(uuid.uuid4()), body=spec)
        self.servers[server.id] = server
        port_id = str(uuid.uuid4())
        self.ports[port_id] = {"id": port_id, "device_id": server.id, "network_id": "net-private",
                               "fixed_ips": [{"ip_address": "10.0.0.5"}]}
        if self.on_server_created:
            self.on_server_created(server)
        context.status_code = 202
        return {"server": {"id": server.id, "links": [], "adminPass": "unused"}}

    def _server_view(self, server: FakeServer) -> dict[str, Any]:
        floating = [ip for ip in self.floating_ips.values() if ip.get("port_id") in self._port_ids(server.id)]
        addresses = [{"addr": "10.0.0.5", "version": 4, "OS-EXT-IPS:type": "fixed"}]
        addresses += [{"addr": ip["floating_ip_address"], "version": 4, "OS-EXT-IPS:type": "floating"}
                      for ip in floating]
        return {
            "id": server.id,
            "name": server.body["name"],
            "status": server.status,
            "metadata": server.body.get("metadata", {}),
            "key_name": server.body.get("key_name"),
            "image": {"id": server.body.get("imageRef")},
            "flavor": {"id": server.body.get("flavorRef")},
            "addresses": {"private": addresses},
            "security_groups": server.body.get("security_groups", []),
        }

    def _port_ids(self, server_id: str) -> set[str]:
        return {pid for pid, port in self.ports.items() if port["device_id"] == server_id}

    def _server_action(self, server_id: str, body: dict[str, Any], context: Any) -> Any:
        server = self.servers.get(server_id)
        if server is None:
            return self._missing(context, "Server")
        if "os-stop" in body:
            if self.on_server_stopped:
                self.on_server_stopped(server)
            server.status = "SHUTOFF"
            context.status_code = 202
            return {}
        if "os-getConsoleOutput" in body:
            return {"output": self.console_for(server) if self.console_for else server.console}
        if "createImage" in body:
            name, metadata = body["createImage"]["name"], body["createImage"].get("metadata", {})
            if self.on_create_image:
                image_id = self.on_create_image(server, name, metadata)
            else:
                image_id = str(uuid.uuid4())
                self.images[image_id] = {"id": image_id, "name": name, "status": "queued", "polls": 0,
                                         "tags": [], **metadata}
            context.status_code = 202
            return {"image_id": image_id}
        context.status_code = 400
        return {"badRequest": {"message": f"fake Nova has no action {sorted(body)}"}}

    def _delete_server(self, server: FakeServer) -> None:
        if self.on_server_deleted:
            self.on_server_deleted(server)
        del self.servers[server.id]
        for port_id in self._port_ids(server.id):
            del self.ports[port_id]
            for ip in self.floating_ips.values():
                if ip.get("port_id") == port_id:
                    ip["port_id"] = None

    # -- Neutron -----------------------------------------------------------------------------------------

    def _network(self, method: str, path: str, body: Any, query: dict, context: Any, request: Any) -> Any:
        if path == "" and method == "GET":
            href = self.network_url.rstrip("/") + "/v2.0/"
            return {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}]}
        path = re.sub(r"^/v2\.0", "", path)
        if path == "/networks":
            found = [n for n in self.networks if all(str(n.get(k)).lower() == v.lower() for k, v in query.items()
                                                       if k in ("name", "id", "router:external"))]
            return {"networks": found}
        if match := re.fullmatch(r"/networks/([^/]+)", path):
            net = next((n for n in self.networks if n["id"] == match[1]), None)
            return {"network": net} if net else self._missing(context, "Network")
        if path == "/ports":
            device = query.get("device_id")
            return {"ports": [p for p in self.ports.values() if device in (None, p["device_id"])]}
        if path == "/security-groups" and method == "POST":
            group = {"id": str(uuid.uuid4()), "tags": [], "security_group_rules": [], **body["security_group"]}
            self.security_groups[group["id"]] = group
            context.status_code = 201
            return {"security_group": group}
        if path == "/security-groups" and method == "GET":
            return {"security_groups": self._tagged(self.security_groups.values(), query)}
        if match := re.fullmatch(r"/(security-groups|floatingips)/([^/]+)/tags", path):
            store = self.security_groups if match[1] == "security-groups" else self.floating_ips
            if match[2] not in store:
                return self._missing(context, match[1])
            store[match[2]]["tags"] = list(body["tags"])
            return {"tags": store[match[2]]["tags"]}
        if match := re.fullmatch(r"/security-groups/([^/]+)", path):
            if method == "DELETE":
                if match[1] not in self.security_groups:
                    return self._missing(context, "Security group")
                in_use = [s for s in self.servers.values()
                          if any(g.get("name") == match[1] for g in s.body.get("security_groups", []))]
                if in_use:
                    context.status_code = 409
                    return {"NeutronError": {"message": f"Security Group {match[1]} in use."}}
                del self.security_groups[match[1]]
                self.rules = {k: r for k, r in self.rules.items() if r["security_group_id"] != match[1]}
                context.status_code = 204
                return {}
            group = self.security_groups.get(match[1])
            return {"security_group": group} if group else self._missing(context, "Security group")
        if path == "/security-group-rules" and method == "POST":
            rule = {"id": str(uuid.uuid4()), **body["security_group_rule"]}
            self.rules[rule["id"]] = rule
            context.status_code = 201
            return {"security_group_rule": rule}
        if path == "/floatingips" and method == "POST":
            ip = {"id": str(uuid.uuid4()), "floating_ip_address": "203.0.113.10", "port_id": None, "tags": [],
                  **body["floatingip"]}
            self.floating_ips[ip["id"]] = ip
            context.status_code = 201
            return {"floatingip": ip}
        if path == "/floatingips" and method == "GET":
            found = self._tagged(self.floating_ips.values(), query)
            if "port_id" in query:
                found = [ip for ip in found if ip.get("port_id") == query["port_id"]]
            return {"floatingips": found}
        if match := re.fullmatch(r"/floatingips/([^/]+)", path):
            ip = self.floating_ips.get(match[1])
            if ip is None:
                return self._missing(context, "Floating IP")
            if method == "DELETE":
                del self.floating_ips[match[1]]
                context.status_code = 204
                return {}
            if method == "PUT":
                ip.update(body["floatingip"])
            return {"floatingip": ip}
        context.status_code = 404
        return {"error": f"fake Neutron has no {method} {path}"}

    @staticmethod
    def _tagged(items: Any, query: dict) -> list[dict[str, Any]]:
        wanted = [tag for tag in query.get("tags", "").split(",") if tag]
        return [item for item in items if all(tag in item.get("tags", []) for tag in wanted)]

    # -- Glance (only when image_url is set) ---------------------------------------------------------------

    def _image(self, method: str, path: str, body: Any, query: dict, context: Any, request: Any) -> Any:
        if path == "" and method == "GET":
            href = self.image_url.rstrip("/") + "/v2/"
            return {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}]}
        path = re.sub(r"^/v2", "", path)
        if path == "/images" and method == "GET":
            found = [self._image_view(i) for i in self.images.values()
                     if all(str(i.get(k)) == v or (k == "tag" and v in i["tags"]) for k, v in query.items()
                            if k not in ("limit", "marker"))]
            return {"images": found}
        if match := re.fullmatch(r"/images/([^/]+)/tags/([^/]+)", path):
            image = self.images.get(match[1])
            if image is None:
                return self._missing(context, "Image")
            image["tags"] = sorted({*image["tags"], match[2]})
            context.status_code = 204
            return {}
        if match := re.fullmatch(r"/images/([^/]+)", path):
            image = self.images.get(match[1])
            if image is None:
                return self._missing(context, "Image")
            if method == "DELETE":
                del self.images[match[1]]
                context.status_code = 204
                return {}
            if method == "PATCH":
                for op in json.loads(request.body):
                    image[op["path"].lstrip("/")] = op.get("value")
            if image["status"] == "queued":
                image["polls"] += 1
                if image["polls"] >= 2:
                    image["status"] = self.image_final_status
            return self._image_view(image)
        context.status_code = 404
        return {"error": f"fake Glance has no {method} {path}"}

    @staticmethod
    def _image_view(image: dict[str, Any]) -> dict[str, Any]:
        view = {k: v for k, v in image.items() if k != "polls"}
        return {"disk_format": "qcow2", "container_format": "bare", "visibility": "private", "size": 1024,
                "checksum": "0" * 32, "os_hash_algo": "sha512", "os_hash_value": "1" * 128,
                "created_at": "2026-01-01T00:00:00Z", **view}


def user_data_of(server: FakeServer) -> str:
    return base64.b64decode(server.body.get("user_data", "")).decode()


# -- over real HTTP ------------------------------------------------------------------------------------------


class _HttpRequest:
    """What FakeOpenStack reads of a request (requests-mock's request object), from an HTTP handler."""

    def __init__(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        url = urlsplit(handler.path)
        self.method = handler.command
        self.path_url = handler.path
        self.netloc = handler.headers.get("Host", "")
        self.headers = handler.headers
        self.body = body
        self.qs = parse_qs(url.query)
        self.url = f"http://{self.netloc}{handler.path}"

    def json(self) -> Any:
        return json.loads(self.body)


class _Context:
    def __init__(self) -> None:
        self.status_code = 200


def _handler(fake: FakeOpenStack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            context = _Context()
            result = fake._dispatch(_HttpRequest(self, body), context)
            payload = b"" if context.status_code == 204 else json.dumps(result).encode()
            self.send_response(context.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # `calls` records every request

    return Handler


@contextmanager
def served(fake: FakeOpenStack) -> Iterator[FakeOpenStack]:
    """Serve the fake's Nova and Neutron on 127.0.0.1 (one port each: the fake tells them apart by host:port);
    sets fake.compute_url and fake.network_url to where they answer, and stops both servers afterwards."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake)) for _ in range(2)]
    compute, network = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
    fake.compute_url, fake.network_url = f"{compute}/v2.1", network
    threads = [threading.Thread(target=server.serve_forever, name="fake-openstack", daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        yield fake
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)

"""LAB / TEST ONLY: tiny Glance and Neutron stand-ins for the Nova rig (vmha never calls them).

Nova asks Glance for the image of a server at boot and rebuild (evacuation is a rebuild), and
Neutron for ports and extensions; servers in the rig boot with networks='none'. Glance serves a
version document, the image schema (standard properties, extra ones allowed) and one image;
Neutron answers every collection with an empty list. Standard library only.
`python -m vmha.lab.nova.stubs GLANCE_PORT NEUTRON_PORT IMAGE_ID [ADDRESS]`, on ADDRESS (default 127.0.0.1).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SCHEMA_PROPS: dict[str, dict[str, Any]] = {
    name: {"type": ["null", "string"]}
    for name in (
        "id", "name", "status", "visibility", "owner", "checksum", "container_format", "disk_format",
        "created_at", "updated_at", "self", "file", "schema", "direct_url", "os_hash_algo",
        "os_hash_value",
    )
}  # fmt: skip
_SCHEMA_PROPS.update(
    {
        "protected": {"type": "boolean"},
        "os_hidden": {"type": "boolean"},
        "min_ram": {"type": "integer"},
        "min_disk": {"type": "integer"},
        "size": {"type": ["null", "integer"]},
        "virtual_size": {"type": ["null", "integer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "locations": {"type": "array", "items": {"type": "object"}},
    }
)
IMAGE_SCHEMA = {
    "name": "image",
    "properties": _SCHEMA_PROPS,
    "additionalProperties": {"type": "string"},
    "links": [{"href": "{self}", "rel": "self"}, {"href": "{file}", "rel": "enclosure"}],
}


def image(image_id: str) -> dict[str, Any]:
    return {
        "id": image_id,
        "name": "vmha-rig-image",
        "status": "active",
        "visibility": "public",
        "owner": "admin",
        "protected": False,
        "os_hidden": False,
        "checksum": "d41d8cd98f00b204e9800998ecf8427e",
        "container_format": "bare",
        "disk_format": "raw",
        "min_ram": 0,
        "min_disk": 0,
        "size": 1024,
        "virtual_size": 1024,
        "tags": [],
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "self": f"/v2/images/{image_id}",
        "file": f"/v2/images/{image_id}/file",
        "schema": "/v2/schemas/image",
    }


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Any] = {}
    prefix_empty: str = ""

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.server.server_address!r} {self.command} {self.path} {format % args}\n")

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in self.routes:
            self._send(200, self.routes[path])
        elif self.prefix_empty and path.startswith(self.prefix_empty):
            # Neutron: /v2.0/ports, /v2.0/extensions, ... -> {"ports": []}
            collection = path[len(self.prefix_empty) :].split("/")[0].removesuffix(".json")
            self._send(200, {collection: []})
        else:
            self._send(404, {"error": f"rig stand-in: no {path}"})


def _versions(host: str, port: int, vid: str, path: str) -> dict[str, Any]:
    href = f"http://{host}:{port}/{path}/"
    return {"versions": [{"id": vid, "status": "CURRENT", "links": [{"rel": "self", "href": href}]}]}


def serve(glance_port: int, neutron_port: int, image_id: str, host: str = "127.0.0.1") -> list[ThreadingHTTPServer]:
    img = image(image_id)
    glance = type(
        "Glance",
        (_Handler,),
        {
            "routes": {
                "/": _versions(host, glance_port, "v2.16", "v2"),
                "/versions": _versions(host, glance_port, "v2.16", "v2"),
                "/v2/schemas/image": IMAGE_SCHEMA,
                "/v2/images": {"images": [img]},
                f"/v2/images/{image_id}": img,
            }
        },
    )
    neutron = type(
        "Neutron",
        (_Handler,),
        {"routes": {"/": _versions(host, neutron_port, "v2.0", "v2.0")}, "prefix_empty": "/v2.0/"},
    )
    servers = [ThreadingHTTPServer((host, glance_port), glance), ThreadingHTTPServer((host, neutron_port), neutron)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers


def main() -> None:
    glance_port, neutron_port, image_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    serve(glance_port, neutron_port, image_id, *sys.argv[4:5])
    threading.Event().wait()


if __name__ == "__main__":
    main()

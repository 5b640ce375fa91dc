"""A local HTTP server standing in for the Hub endpoints that an upload calls.

The real ``huggingface_hub`` client talks to it over HTTP: create repo, create branch, validate the
card's YAML, ask the upload mode of every file (all "regular", so contents travel base64 in the
commit) and post the commit as NDJSON. The server records what it received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """``models``: repository id -> {file name: (content, size the listing claims)}, served for
    download (``resolve``) and listed with their sizes (``model_info(files_metadata=True)``)."""

    SHA = "b" * 40

    def __init__(self, fail_commit: bool = False, models: dict[str, dict[str, tuple[bytes, int]]] | None = None):
        self.models = models or {}
        self.calls: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.fail_commit = fail_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, status: int, body: dict | list) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self):
                self._file(send_body=False)

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                if self.path.startswith("/api/whoami"):
                    return self._reply(200, {"name": "tester", "type": "user"})
                parts = self.path.split("?")[0].split("/")  # /api/models/{ns}/{name}[/revision/{rev}]
                if len(parts) >= 5 and parts[:3] == ["", "api", "models"]:
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.models:
                        return self._reply(404, {"error": "Repository not found"})
                    if len(parts) >= 7 and parts[5] == "tree":  # /tree/{rev}[/{folder}]: the folder's files
                        return self._tree(repo_id, "/".join(parts[7:]), "recursive=true" in self.path)
                    siblings = [{"rfilename": name, "size": size} for name, (_, size) in hub.models[repo_id].items()]
                    return self._reply(200, {"id": repo_id, "sha": hub.SHA, "siblings": siblings})
                if "/resolve/" in self.path:
                    return self._file(send_body=True)
                return self._reply(404, {"error": "not found"})

            def _tree(self, repo_id: str, folder: str, recursive: bool) -> None:
                prefix = f"{folder}/" if folder else ""
                entries = [
                    {"type": "file", "path": name, "size": size, "oid": hashlib.sha1(content).hexdigest()}
                    for name, (content, size) in hub.models[repo_id].items()
                    if name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :])
                ]
                if folder and not entries:  # as the Hub answers for a folder the repository lacks
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._reply(200, entries)

            def _file(self, send_body: bool) -> None:
                """/{ns}/{name}/resolve/{revision}/{file}: the file, with the headers a download reads."""
                hub.calls.append(("HEAD" if not send_body else "GET", self.path))
                repo, _, rest = self.path.split("?")[0].lstrip("/").partition("/resolve/")
                name = rest.partition("/")[2]
                content = hub.models.get(repo, {}).get(name, (None, 0))[0]
                if content is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.SHA)
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if send_body:
                    self.wfile.write(content)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                hub.calls.append(("POST", path))
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                    hub.repos[repo_id] = payload
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{revision}
                if len(parts) >= 7 and parts[2] == "models":
                    repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                    for f in files
                                ]
                            },
                        )
                    if action == "branch":
                        hub.branches.append((repo_id, revision))
                        return self._reply(200, {})
                    if action == "commit":
                        if hub.fail_commit:
                            return self._reply(500, {"error": "Internal Error - the Hub fell over"})
                        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                        header = next(item["value"] for item in lines if item["key"] == "header")
                        files = {
                            item["value"]["path"]: base64.b64decode(item["value"]["content"])
                            for item in lines
                            if item["key"] == "file"
                        }
                        hub.commits.append({"repo_id": repo_id, "revision": revision, "header": header, "files": files})
                        return self._reply(
                            200,
                            {
                                "commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}",
                                "commitOid": "a" * 40,
                                "pullRequestUrl": None,
                            },
                        )
                return self._reply(404, {"error": f"unexpected {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

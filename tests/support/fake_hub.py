"""A loopback Hugging Face Hub: just the HTTP API huggingface_hub's real client uses to download
a snapshot (repo info, tree, resolve with HEAD/GET), to stream dataset files (tree listings by
folder, ranged GETs) and to publish (create repo, preupload, commit, and the model-card check),
over an in-memory store of model and dataset repositories. Point the client at it with
HF_ENDPOINT."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_loopback_token"


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    commits: int = 0

    @property
    def sha(self) -> str:
        digest = hashlib.sha1(repr(sorted(self.files.items())).encode()).hexdigest()
        return digest[:-4] + f"{self.commits:04x}"


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    datasets: dict[str, Repo] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            store = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def serve_this_process(self, monkeypatch) -> None:
        """Point huggingface_hub, already imported in this process (and the processes it forks),
        at this Hub: the client reads HF_ENDPOINT only at import."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    store: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    # ----- helpers ---------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str = "") -> None:
        self._json(status, {"error": message or code},
                   {"X-Error-Code": code, "X-Error-Message": message or code})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

    def _repo(self, repo_id: str, kind: str = "models") -> Repo | None:
        """The repository, or None after answering as the Hub does when it cannot be read."""
        repo = (self.store.datasets if kind == "datasets" else self.store.repos).get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # the Hub says 401 to anonymous requests, 404 to authenticated ones
            self._error(404 if self._authorized() else 401, "RepoNotFound")
            return None
        if repo.gated:
            self._error(403 if self._authorized() else 401, "GatedRepo", "Access to model is restricted")
            return None
        return repo

    def _revision(self, repo: Repo, revision: str) -> bool:
        if unquote(revision) in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    # ----- routes ----------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        self.store.requests.append(" ".join(filter(None, (self.command, path,
                                                          self.headers.get("Range")))))
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self._repo(match[2], match[1])
            if repo and self._revision(repo, match[3] or "main"):
                self._json(200, {"id": match[2], "modelId": match[2], "sha": repo.sha,
                                 "private": repo.private,
                                 "siblings": [{"rfilename": name} for name in sorted(repo.files)]})
        elif match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            repo = self._repo(match[2], match[1])
            if repo and self._revision(repo, match[3]):
                recursive = parse_qs(urlparse(self.path).query).get("recursive") == ["true"]
                self._tree(repo, unquote(match[4] or "").strip("/"), recursive)
        elif match := re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(match[2], "datasets" if match[1] else "models")
            if repo and self._revision(repo, match[3]):
                name = unquote(match[4])
                if name not in repo.files:
                    self._error(404, "EntryNotFound")
                    return
                self._file(repo, repo.files[name])
        else:
            self._error(404, "NotFound", path)

    def _tree(self, repo: Repo, folder: str, recursive: bool) -> None:
        """The entries under FOLDER: its files and folders, or everything below it when recursive."""
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for name, data in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth == 1 or recursive:
                    sub = prefix + "/".join(parts[:depth])
                    entries.setdefault(sub, {"type": "directory", "path": sub,
                                             "oid": hashlib.sha1(sub.encode()).hexdigest()})
            if len(parts) == 1 or recursive:
                entries[name] = {"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()}
        if folder and not entries:
            self._error(404, "EntryNotFound", f"{folder} does not exist")
            return
        self._json(200, list(entries.values()))

    def _file(self, repo: Repo, data: bytes) -> None:
        """A file's bytes, or the byte range a Range header asks for (206)."""
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted is None:
            self._send(200, data, headers, content_type="application/octet-stream")
            return
        start = int(wanted[1])
        end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
        if start >= len(data):
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        self.store.requests.append(f"POST {path}")
        body = self._body()
        if not self._authorized():
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        elif path == "/api/validate-yaml":  # the client checks a README's front matter
            front = json.loads(body)["content"].split("---")[1]
            self._json(200, {"errors": [], "warnings": []} if front.strip() else
                       {"errors": [{"message": "empty metadata"}]})
        elif path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get(
                "organization") else request["name"]
            if repo_id in self.store.repos:
                self._error(409, "RepoExists", "You already created this model repo")
                return
            self.store.repos[repo_id] = Repo(private=bool(request.get("private")))
            self._json(200, {"url": f"{self.store.url}/{repo_id}", "name": repo_id})
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            if self._repo(match[1]):
                files = json.loads(body)["files"]
                self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                            "shouldIgnore": False} for f in files]})
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            repo = self._repo(match[1])
            if repo:
                for line in body.decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        repo.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                repo.commits += 1
                self._json(200, {"success": True, "commitOid": repo.sha,
                                 "commitUrl": f"{self.store.url}/{match[1]}/commit/{repo.sha}"})
        else:
            self._error(404, "NotFound", path)

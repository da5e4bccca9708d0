"""A fake Hugging Face Hub on 127.0.0.1: only the endpoints `synthgen push` makes the client call.

Speaks what huggingface_hub's `create_repo`, `dataset_info`, `create_branch` and `upload_folder`
send (validate-yaml, preupload, LFS batch + PUT + verify, NDJSON commit) and records every request
and every committed file's bytes, so a test can assert exactly what was published.
Xet storage (hf_xet's CAS protocol) is not faked: run the client with `lfs=False` (every file
"regular", inlined in the commit) or with hf_xet disabled and `lfs=True`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"  # the client quotes revisions with safe="", so one path segment


def git_blob_sha1(data: bytes) -> str:
    """The oid the client computes for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    oid: str
    files: dict[str, bytes]  # what this commit added, path -> bytes


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, StoredFile]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


class FakeHub:
    """The server's state and lifecycle; `url` is the endpoint to give HfApi."""

    def __init__(self, token: str | None = "hf_fake_write_token", lfs: bool = False):
        self.token = token
        self.lfs = lfs  # True: binary files are "lfs" in preupload, as on the real Hub
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path without query)
        self.unhandled: list[tuple[str, str]] = []
        self.repos: dict[str, FakeRepo] = {}
        self.commits: list[Commit] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes, uploaded but maybe uncommitted
        self.authorizations: set[str | None] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def received(self, repo_id: str) -> dict[str, bytes]:
        """Every file committed to `repo_id`, on any branch, path -> bytes."""
        files: dict[str, bytes] = {}
        for commit in self.commits:
            if commit.repo_id == repo_id:
                files.update(commit.files)
        return files

    def endpoints(self) -> list[str]:
        """The distinct routes called, with repo ids, revisions and oids abstracted away."""
        seen: list[str] = []
        for method, path in self.requests:
            route = f"{method} {_route_name(path)}"
            if route not in seen:
                seen.append(route)
        return seen


def _route_name(path: str) -> str:
    path = re.sub(r"^/api/datasets/[^/]+/[^/]+", "/api/datasets/{repo_id}", path)
    path = re.sub(r"^/datasets/[^/]+/[^/]+\.git/", "/datasets/{repo_id}.git/", path)
    path = re.sub(r"/(preupload|commit|branch|revision)/[^/]+$", r"/\1/{revision}", path)
    return re.sub(r"/lfs-(upload|verify)/.+$", r"/lfs-\1/{oid}", path)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: object):
        self.status, self.message, self.code, self.extra = status, message, code, extra


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response has a length
    timeout = 10  # an idle keep-alive connection never pins a thread for long
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
        name, match = _route(method, path)
        if match is None:
            with hub.lock:
                hub.unhandled.append((method, path))
            self._send(404, {"error": f"fake hub: no route for {method} {path}"})
            return
        auth = self.headers.get("Authorization")
        with hub.lock:
            hub.authorizations.add(auth)
        try:
            if name != "lfs_upload" and hub.token and auth != f"Bearer {hub.token}":
                raise _HubError(401, "Invalid credentials in Authorization header")
            with hub.lock:
                status, payload = getattr(self, f"_{name}")(body, **match.groupdict())
        except _HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message, **err.extra}, headers)
            return
        self._send(status, payload)

    def _repo(self, repo_id: str) -> FakeRepo:
        if repo_id not in self.hub.repos:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.hub.repos[repo_id]

    def _branch(self, repo: FakeRepo, rev: str) -> dict[str, StoredFile]:
        rev = unquote(rev)
        if rev not in repo.branches:
            raise _HubError(404, f"Revision {rev} not found", "RevisionNotFound")
        return repo.branches[rev]

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, body: bytes) -> tuple[int, object]:
        request = json.loads(body)
        if request.get("type") != "dataset":
            raise _HubError(400, f"fake hub only serves dataset repos, got {request.get('type')}")
        repo_id = f"{request['organization']}/{request['name']}"
        url = f"{self.hub.url}/datasets/{repo_id}"
        if repo_id in self.hub.repos:
            # create_repo(exist_ok=True) takes the repo URL from this 409 body.
            raise _HubError(409, "You already created this dataset repo", url=url)
        private = request.get("visibility") == "private"
        self.hub.repos[repo_id] = FakeRepo(repo_id, private=private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _dataset_info(self, body: bytes, repo: str, rev: str = "main") -> tuple[int, object]:
        fake = self._repo(repo)
        files = self._branch(fake, rev)
        siblings = [{"rfilename": path} for path in sorted(files)]
        sha = fake.heads[unquote(rev)]
        return 200, {"id": repo, "private": fake.private, "sha": sha, "siblings": siblings}

    def _create_branch(self, body: bytes, repo: str, rev: str) -> tuple[int, object]:
        fake, branch = self._repo(repo), unquote(rev)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        if branch in fake.branches:
            raise _HubError(409, f"Reference {branch} already exists")
        fake.branches[branch] = dict(self._branch(fake, start))
        fake.heads[branch] = fake.heads[start]
        return 200, {}

    def _validate_yaml(self, body: bytes) -> tuple[int, object]:
        request = json.loads(body)
        if request.get("repoType") != "dataset" or not request.get("content", "").startswith("---"):
            raise _HubError(400, "fake hub expects a dataset card with YAML front matter")
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, object]:
        files = self._branch(self._repo(repo), rev)
        answer = []
        for entry in json.loads(body)["files"]:
            binary = b"\0" in base64.b64decode(entry["sample"])
            stored = files.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if self.hub.lfs and binary else "regular",
                    "shouldIgnore": False,
                    "oid": stored.oid if stored else None,
                }
            )
        return 200, {"files": answer, "commitOid": "0" * 40}

    def _lfs_batch(self, body: bytes, repo: str) -> tuple[int, object]:
        self._repo(repo)
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", []):
            raise _HubError(400, "fake hub only does basic LFS uploads")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, body: bytes, oid: str) -> tuple[int, object]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, "uploaded bytes do not match the LFS oid")
        self.hub.lfs_objects[oid] = body
        return 200, {}

    def _lfs_verify(self, body: bytes, oid: str) -> tuple[int, object]:
        request = json.loads(body)
        stored = self.hub.lfs_objects.get(oid)
        if request.get("oid") != oid or stored is None or len(stored) != request.get("size"):
            raise _HubError(404, f"LFS object {oid} not found")
        return 200, {}

    def _commit(self, body: bytes, repo: str, rev: str) -> tuple[int, object]:
        fake = self._repo(repo)
        files = self._branch(fake, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise _HubError(400, "commit payload must start with a header line")
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(added[value["path"]], lfs=False)
            elif line["key"] == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise _HubError(400, f"LFS object for {value['path']} was never uploaded")
                added[value["path"]] = data
                files[value["path"]] = StoredFile(data, lfs=True)
            else:
                raise _HubError(400, f"fake hub does not support commit line {line['key']}")
        branch = unquote(rev)
        oid = hashlib.sha1(f"{repo}@{branch}#{len(self.hub.commits)}".encode()).hexdigest()
        fake.heads[branch] = oid
        self.hub.commits.append(Commit(repo, branch, lines[0]["value"]["summary"], oid, added))
        url = f"{self.hub.url}/datasets/{repo}/commit/{oid}"
        return 200, {"commitUrl": url, "commitOid": oid, "success": True, "pullRequestUrl": None}

    def _whoami(self, body: bytes) -> tuple[int, object]:
        return 200, {"type": "user", "name": "synthgen-tester", "auth": {"type": "access_token"}}


_ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", rf"/api/datasets/{_REPO}", "dataset_info"),
    ("GET", rf"/api/datasets/{_REPO}/revision/{_REV}", "dataset_info"),
    ("POST", rf"/api/datasets/{_REPO}/branch/{_REV}", "create_branch"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/datasets/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/datasets/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", "lfs_verify"),
    ("POST", rf"/api/datasets/{_REPO}/commit/{_REV}", "commit"),
    ("GET", r"/api/whoami-v2", "whoami"),
]


def _route(method: str, path: str) -> tuple[str, re.Match[str] | None]:
    for route_method, pattern, name in _ROUTES:
        match = re.fullmatch(pattern, path)
        if route_method == method and match:
            return name, match
    return "", None

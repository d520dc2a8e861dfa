"""A minimal in-memory Hugging Face Hub served over real HTTP on 127.0.0.1, for tests.

It implements the endpoints huggingface_hub 2.4 and transformers 5 use for `create_repo`, `create_branch`,
`create_commit` (README validation, preupload answering "regular" so no LFS/Xet traffic, ndjson commit with
`create_pr`), `repo_info`/`model_info`, and file download (`HEAD`/`GET .../resolve/{revision}/{path}`).
Private repos answer 404 unless the request carries the creating token. Every request is recorded (method, path,
authorization header) so tests can check what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    owner_token: str | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files

    def lookup(self, revision: str) -> tuple[dict[str, bytes], str] | None:
        """Files and commit of a branch name or a commit oid."""
        if revision in self.branches:
            return self.branches[revision], self.heads[revision]
        if revision in self.snapshots:
            return self.snapshots[revision], revision
        return None
    prs: int = 0


class FakeHub:
    """State plus a running server. Use as a context manager; `endpoint` is the base URL."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[dict] = []
        self.fail_commits = 0  # answer the next N commit calls with HTTP 500
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------- helpers
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[revision]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            # ------------------------------------------------------------------ plumbing
            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, code: int, payload=None, headers: dict | None = None, head: bool = False) -> None:
                body = b"" if payload is None else payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, code: int, kind: str, message: str, head: bool = False) -> None:
                self._send(code, {"error": message}, {"X-Error-Code": kind, "X-Error-Message": message}, head=head)

            def _token(self) -> str | None:
                auth = self.headers.get("Authorization") or ""
                return auth[7:] if auth.startswith("Bearer ") else None

            def _record(self, body: bytes = b"") -> None:
                with hub.lock:
                    hub.requests.append(
                        {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                    )

            def _repo(self, repo_id: str, head: bool = False) -> FakeRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and self._token() != repo.owner_token):
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                    return None
                return repo

            # ------------------------------------------------------------------ verbs
            def do_HEAD(self) -> None:
                self._record()
                self._resolve(head=True)

            def do_GET(self) -> None:
                self._record()
                path = urlsplit(self.path).path
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/") :]
                    parts = rest.split("/")
                    repo_id = "/".join(parts[:2])
                    if len(parts) > 3 and parts[2] == "tree":  # file listing (snapshot_download)
                        repo = self._repo(repo_id)
                        if repo is None:
                            return
                        found = repo.lookup(unquote(parts[3]))
                        if found is None:
                            return self._error(404, "RevisionNotFound", f"Revision {parts[3]} not found")
                        listing = [
                            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in sorted(found[0].items())
                        ]
                        return self._send(200, listing)
                    revision = unquote("/".join(parts[3:])) if len(parts) > 3 and parts[2] == "revision" else "main"
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    found = repo.lookup(revision)
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
                    files, sha = found
                    card_data = None
                    readme = files.get("README.md", b"").decode()
                    if readme.startswith("---\n") and "\n---" in readme[4:]:
                        import yaml

                        card_data = yaml.safe_load(readme[4 : readme.index("\n---", 4)])
                    return self._send(
                        200,
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": sha,
                            "private": repo.private,
                            "siblings": [{"rfilename": name} for name in sorted(files)],
                            "tags": [],
                            "cardData": card_data,
                        },
                    )
                self._resolve(head=False)

            def _resolve(self, head: bool) -> None:
                path = urlsplit(self.path).path.lstrip("/")
                if "/resolve/" not in path:
                    return self._error(404, "EntryNotFound", f"unknown route {path}", head=head)
                repo_id, rest = path.split("/resolve/", 1)
                repo = self._repo(repo_id, head=head)
                if repo is None:
                    return
                rest = unquote(rest)
                names = sorted([*repo.branches, *repo.snapshots], key=len, reverse=True)
                revision = next((b for b in names if rest.startswith(b + "/")), None)
                if revision is None:
                    return self._error(404, "RevisionNotFound", f"revision not found in {rest}", head=head)
                files, sha = repo.lookup(revision)
                filename = rest[len(revision) + 1 :]
                data = files.get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} not found", head=head)
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                headers = {"X-Repo-Commit": sha, "ETag": etag}
                self._send(200, data, headers, head=head)

            def do_POST(self) -> None:
                body = self._body()
                self._record(body)
                split = urlsplit(self.path)
                path, query = split.path, parse_qs(split.query)
                if path == "/api/repos/create":
                    payload = json.loads(body or b"{}")
                    repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                    if repo_id in hub.repos:  # the Hub answers 409 with the repo url
                        return self._send(
                            409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}
                        )
                    private = payload.get("visibility") == "private" or bool(payload.get("private"))
                    hub.repos[repo_id] = FakeRepo(repo_id, private, self._token())
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/"):
                    parts = path[len("/api/models/") :].split("/")
                    repo_id, action, revision = "/".join(parts[:2]), parts[2], unquote("/".join(parts[3:]))
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(
                            200,
                            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                        )
                    if action == "branch":
                        if revision in repo.branches:
                            return self._error(409, "BranchExists", f"branch {revision} exists")
                        repo.branches[revision] = dict(repo.branches["main"])
                        repo.heads[revision] = repo.heads["main"]
                        return self._send(200, {})
                    if action == "commit":
                        return self._commit(repo, revision, body, query.get("create_pr") == ["1"])
                self._error(404, "EntryNotFound", f"unknown route {path}")

            def _commit(self, repo: FakeRepo, revision: str, body: bytes, create_pr: bool) -> None:
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self._error(500, "InternalError", "simulated server failure")
                if revision not in repo.branches:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                target = revision
                if create_pr:
                    repo.prs += 1
                    target = f"refs/pr/{repo.prs}"
                    repo.branches[target] = dict(repo.branches[revision])
                files = dict(repo.branches[target])
                for item in lines:
                    if item["key"] == "file":
                        value = item["value"]
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                oid = hashlib.sha1(f"{repo.repo_id}{len(repo.commits)}{header['summary']}".encode()).hexdigest()
                repo.branches[target] = files
                repo.heads[target] = oid
                repo.snapshots[oid] = dict(files)
                repo.commits.append({"oid": oid, "revision": target, "summary": header["summary"], "files": sorted(files)})
                out = {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid}
                out["pullRequestUrl"] = f"{hub.endpoint}/{repo.repo_id}/discussions/{repo.prs}" if create_pr else None
                self._send(200, out)

        return Handler

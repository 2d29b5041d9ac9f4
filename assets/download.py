"""Verified, resumable downloads over plain HTTP(S) (standard library only).

- A file streams into `NAME.part` beside its final place; after an interruption the next attempt
  (in the same call, or a later run) continues it with an HTTP Range request.
- The SHA-256 is checked before an atomic `os.replace` onto the final name: a half or wrong file
  never appears under the final name. A mismatch deletes the temporary file and names both hashes.
- A Hugging Face repository snapshot uses the hub's public HTTP layout
  (`GET {hub}/api/models/{repo}/revision/{rev}?blobs=true`, `GET {hub}/{repo}/resolve/{commit}/{path}`),
  checks every file against the hub's LFS SHA-256 or git blob id, and is staged in `DIR.part/`
  until complete, then renamed onto `DIR`.
- Nothing here decides *whether* to download: callers (discovery.install) only get here when the
  user asked for remote fetch.
"""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import AssetError
from .hashing import hash_file

CHUNK = 1 << 16
USER_AGENT = "dreamforge-upscale/0.1 (+assets)"
_DROPPED = (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException)


@dataclass
class FetchResult:
    path: Path
    sha256: str
    size: int
    url: str
    requests: int = 0  # HTTP requests made
    resumed_from: list[int] = field(default_factory=list)  # byte offsets of Range requests


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the hub reports as blobId for non-LFS files)."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    return hash_file(path, digest).hexdigest()


def _progress(label: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                file=sys.stderr, disable=not enabled, mininterval=0.5, dynamic_ncols=True, leave=True)


def unreachable_message(url: str, reason, where: str) -> str:
    return (f"could not reach {url} ({reason}). You look offline, or the host is blocked. "
            f"Fetch it on a machine with network access and {where}; then run the command again.")


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", exc)
    return f"{type(inner).__name__}: {inner}"


def _open(url: str, offset: int, timeout: float, hand_place: str):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return err  # range not satisfiable: the .part may already be complete; checked by the caller
        hint = {404: "the file is not at this address: check the URL (manifest or catalogue entry)",
                401: "the server wants credentials: download it by hand",
                403: "the server refused access: download it by hand"}.get(err.code, "try again later")
        raise AssetError(f"HTTP {err.code} {err.reason} for {url}: {hint}; or {hand_place}.") from None
    except urllib.error.URLError as err:
        raise AssetError(unreachable_message(url, _reason(err), hand_place)) from None
    except (socket.timeout, TimeoutError, ConnectionError) as err:
        raise AssetError(unreachable_message(url, _reason(err), hand_place)) from None


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    # "bytes 100-199/200" -> (100, 200)
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-")[0]
    try:
        return int(start), (int(total) if total.strip() not in ("", "*") else None)
    except ValueError:
        return None, None


def fetch_url(url: str, dest: str | os.PathLike, *, sha256: str | None = None, git_blob: str | None = None,
              size: int | None = None, label: str | None = None, progress: bool = True, timeout: float = 30.0,
              retries: int = 3, hand_place: str | None = None) -> FetchResult:
    """Download `url` to `dest` through `dest.part`, resuming, verified (SHA-256 and/or git blob id, size).

    `retries`: how many times a dropped connection is resumed within this call; after that the
    .part file stays and the next call resumes it. `hand_place`: how to finish by hand (for errors).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    label = label or dest.name
    hand_place = hand_place or (f"put the file at {dest}" + (f" (SHA-256 {sha256})" if sha256 else ""))
    result = FetchResult(dest, "", 0, url)
    total = size
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if total is not None and offset > total:
            part.unlink()
            offset = 0
        if total is not None and offset == total and offset:
            break  # a previous run already has every byte: verify it
        result.requests += 1
        if offset:
            result.resumed_from.append(offset)
        resp = _open(url, offset, timeout, hand_place)
        if isinstance(resp, urllib.error.HTTPError):  # 416 on a resume: nothing left to send
            resp.close()
            break
        with resp:
            if offset and resp.status == 206:
                start, full = _content_range_start(resp.headers.get("Content-Range"))
                if start != offset:  # a range we did not ask for: start over
                    part.unlink()
                    continue
                total = full if full is not None else total
            elif offset:  # the server ignored Range (200): it sends the whole file again
                offset = 0
            length = resp.headers.get("Content-Length")
            if total is None and length is not None and length.isdigit():
                total = offset + int(length)
            bar = _progress(label, total, offset, progress)
            got = offset
            try:
                with open(part, "ab" if offset else "wb") as fh:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            except _DROPPED:
                pass  # judged below by the byte count
            finally:
                bar.close()
        if total is None or got >= total:
            break
        attempt += 1
        if attempt > retries:
            raise AssetError(
                f"download of {url} was interrupted at {got:,} of {total:,} bytes ({attempt} attempts). The "
                f"partial file {part} is kept: run the same command again to resume it, or {hand_place}."
            )
        print(f"{label}: connection lost at {got:,} of {total:,} bytes; resuming", file=sys.stderr)

    actual_size = part.stat().st_size
    digest = hash_file(part).hexdigest()
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size mismatch: expected {size:,} bytes, got {actual_size:,}")
    if sha256 and digest != sha256:
        problems.append(f"SHA-256 mismatch: expected {sha256}, got {digest}")
    if git_blob and git_blob_sha1(part) != git_blob:
        problems.append(f"git blob id mismatch: expected {git_blob}, got {git_blob_sha1(part)}")
    if problems:
        part.unlink()
        raise AssetError(
            f"{label} from {url}: {'; '.join(problems)}. The temporary file was deleted and nothing was "
            "installed. If the source changed on purpose, update the expected hash; otherwise retry "
            "(the download was damaged) or fetch the file from another source."
        )
    os.replace(part, dest)
    result.sha256, result.size = digest, actual_size
    return result


def copy_verified(src: Path, dest: Path, sha256: str | None, label: str | None = None) -> tuple[str, int]:
    """Copy a local file onto `dest` through `dest.part`, verified like a download."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
    got = digest.hexdigest()
    if sha256 and got != sha256:
        part.unlink()
        raise AssetError(f"{label or dest.name}: {src} has SHA-256 {got}, expected {sha256}: it is not the right "
                         "file (or it is damaged); nothing was installed. Replace or remove it.")
    os.replace(part, dest)
    return got, dest.stat().st_size


# ------------------------------------------------------------------------------------- hub snapshots
@dataclass
class SnapshotResult:
    path: Path
    commit: str
    files: dict[str, str]  # repo path -> sha256
    size: int
    requests: list[str] = field(default_factory=list)  # repo paths downloaded (not already staged)


def tree_sha256(files: dict[str, str]) -> str:
    """One hash for a folder: SHA-256 over its sorted 'path\\0sha256\\n' lines."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def _wanted(siblings: list[dict], ignore: tuple[str, ...]) -> list[dict]:
    """Drop ignored files and, in any folder that has .safetensors weights, the .bin duplicates."""
    keep = [s for s in siblings if not any(fnmatch.fnmatch(s["rfilename"], p) or
                                           fnmatch.fnmatch(s["rfilename"].rsplit("/", 1)[-1], p) for p in ignore)]
    with_st = {s["rfilename"].rpartition("/")[0] for s in keep if s["rfilename"].endswith(".safetensors")}
    return [s for s in keep if not (s["rfilename"].endswith(".bin") and s["rfilename"].rpartition("/")[0] in with_st)]


def _safe_repo_path(name: str, repo: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise AssetError(f"{repo}: the hub listed an unsafe file name {name!r}; refusing to write it")
    return name


def snapshot_info(hub: str, repo: str, revision: str, timeout: float, hand_place: str) -> dict:
    url = f"{hub}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}?blobs=true"
    resp = _open(url, 0, timeout, hand_place)
    with resp:
        try:
            info = json.loads(resp.read().decode())
        except (ValueError, *_DROPPED) as exc:
            raise AssetError(f"{url} did not return the repository's file list as JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("siblings"), list) or not info.get("sha"):
        raise AssetError(f"{url}: answer has no 'sha' and 'siblings' (file list): is {hub} a Hugging Face hub?")
    return info


def fetch_snapshot(repo: str, revision: str, dest: str | os.PathLike, *, hub: str, ignore: tuple[str, ...] = (),
                   progress: bool = True, timeout: float = 30.0, retries: int = 3) -> SnapshotResult:
    """Download repository `repo` at `revision` into folder `dest` (staged in `dest.part/`, then renamed)."""
    dest = Path(dest)
    stage = dest.with_name(dest.name + ".part")
    hand_place = (f"put the repository snapshot in {dest} (e.g. `huggingface-cli download {repo} --revision "
                  f"{revision} --local-dir {dest}`)")
    info = snapshot_info(hub, repo, revision, timeout, hand_place)
    commit = info["sha"]
    siblings = _wanted([s for s in info["siblings"] if isinstance(s, dict) and s.get("rfilename")], ignore)
    if not any(s["rfilename"] == "model_index.json" for s in siblings):
        raise AssetError(f"{repo}@{revision} has no model_index.json: it is not a diffusers repository "
                         "(check 'repo' and 'revision')")
    stage.mkdir(parents=True, exist_ok=True)
    files, total, fetched = {}, 0, []
    for sib in siblings:
        name = _safe_repo_path(sib["rfilename"], repo)
        lfs = sib.get("lfs") or {}
        want_sha = lfs.get("sha256")
        want_blob = None if want_sha else sib.get("blobId")
        want_size = lfs.get("size", sib.get("size"))
        target = stage / name
        if target.exists():  # staged by an interrupted earlier run: keep it if it checks out
            ok = (hash_file(target).hexdigest() == want_sha) if want_sha else \
                 (git_blob_sha1(target) == want_blob) if want_blob else False
            if not ok:
                target.unlink()
        if not target.exists():
            url = f"{hub}/{repo}/resolve/{commit}/{urllib.parse.quote(name)}"
            fetch_url(url, target, sha256=want_sha, git_blob=want_blob, size=want_size, label=f"{repo.split('/')[-1]}/{name}",
                      progress=progress, timeout=timeout, retries=retries, hand_place=hand_place)
            fetched.append(name)
            if not want_sha and not want_blob:
                print(f"warning: {repo}/{name}: the hub gave no hash for it; recorded as downloaded", file=sys.stderr)
        files[name] = hash_file(target).hexdigest()
        total += target.stat().st_size
    for leftover in sorted(stage.rglob("*"), reverse=True):  # from another revision or an older run
        rel = leftover.relative_to(stage).as_posix()
        if leftover.is_file() and rel not in files:
            leftover.unlink()
        elif leftover.is_dir() and not any(leftover.iterdir()):
            leftover.rmdir()
    if dest.exists():  # replace an older snapshot only once the new one is complete
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(stage, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, dest)
    return SnapshotResult(dest, commit, files, total, fetched)

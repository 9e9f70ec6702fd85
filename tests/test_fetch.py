"""data_tools fetch against a loopback HTTP server (127.0.0.1, files the test makes; never
the internet): a good download, --list, a corrupt one, an interrupted one resumed with a
Range request, a server that ignores Range, files put by hand, and offline (a closed port)."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_tools.__main__ import main
from data_tools.fetch import (
    _BOOKS,
    BASE_URL_VAR,
    CATALOGUE,
    EXIT_CHECKSUM,
    EXIT_NETWORK,
    ChecksumError,
    DataSet,
    Entry,
    NetworkError,
    fetch,
    kjv_split,
)


class Server:
    """Serves ``files`` (URL path, leading slash dropped -> bytes) with Range support and
    records each request. ``drop``: paths whose next response sends the full Content-Length
    but only half the bytes, then closes the connection. ``ignore_range``: always answer 200
    with everything."""

    def __init__(self):
        self.files, self.requests, self.drop, self.ignore_range = {}, [], set(), False
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng, path = self.headers.get("Range"), self.path.lstrip("/")
                srv.requests.append((path, rng))
                body = srv.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not srv.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in srv.drop:
                    srv.drop.discard(path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def payload(n, seed):
    """``n`` deterministic bytes that differ per seed (not all one value: a resume that
    restarts at the wrong offset must show)."""
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def git_tree_id(folder, executable):
    """The tree id git itself computes for ``folder`` (the reference for folder_digests)."""
    repo = folder.parent / "gitref"
    shutil.copytree(folder, repo)
    for name in executable:
        os.chmod(repo / name, 0o755)
    run = {"cwd": repo, "check": True, "capture_output": True, "text": True}
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run(["git", "-c", "core.fileMode=true", "add", "."], **run)
    return subprocess.run(["git", "write-tree"], **run).stdout.strip()


@pytest.fixture
def toy(tmp_path, server):
    """A small catalogue whose files the server holds, hashes computed independently:
    hashlib for the files, ``sha256sum`` and ``git write-tree`` for the folder."""
    a, b = payload(300_000, 1), payload(1_000, 2)
    members = {"0_x_0.wav": payload(5_000, 3), "0_y_0.wav": payload(7_000, 4),
               "1_x_0.wav": payload(100, 5)}
    ref = tmp_path / "ref" / "rec"
    ref.mkdir(parents=True)
    for name, data in members.items():
        (ref / name).write_bytes(data)
        server.files[f"toy/rec/{name}"] = data
    listing = subprocess.run(["sha256sum", *sorted(members)], cwd=ref, check=True,
                             capture_output=True, env={**os.environ, "LC_ALL": "C"}).stdout
    server.files["toy/a.bin"], server.files["toy/b.bin"] = a, b
    entries = (
        Entry("a.bin", hashlib.sha256(a).hexdigest(), len(a), hashlib.md5(a).hexdigest()),
        Entry("b.bin", hashlib.sha256(b).hexdigest(), len(b)),
        Entry("rec", hashlib.sha256(listing).hexdigest(), members=tuple(sorted(members)),
              git=git_tree_id(ref, ["0_y_0.wav"]), executable=frozenset({"0_y_0.wav"})))
    cat = {"toy": DataSet("toy", "a toy set", "CC0", ("https://example.invalid/toy/",),
                          "test", entries)}
    return cat, {"a.bin": a, "b.bin": b}, members


def errors(stderr):
    """stderr without the progress lines: what the user is told went wrong."""
    return [s for s in stderr.splitlines() if not s.startswith("[data_tools] ")]


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*.part"))


def test_good_download_is_verified(tmp_path, server, toy):
    cat, files, members = toy
    logs = []
    dest = fetch("toy", tmp_path / "out", catalogue=cat, base_url=server.url, log=logs.append)
    assert dest == tmp_path / "out" / "toy"
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in (dest / "rec").iterdir()) == sorted(members)
    for name, data in members.items():
        assert (dest / "rec" / name).read_bytes() == data
    assert leftovers(dest) == []
    assert all(rng is None for _, rng in server.requests)
    # a second run downloads nothing: the files in place are verified
    n = len(server.requests)
    fetch("toy", tmp_path / "out", catalogue=cat, base_url=server.url, log=logs.append)
    assert len(server.requests) == n
    assert sum("already there" in s for s in logs) == 3


def test_list_names_every_set_and_its_source(capsys):
    assert main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    for ds in CATALOGUE.values():
        assert f"{ds.name}: " in out and ds.urls[0] in out
        assert all(u.startswith("https://") for u in ds.urls)
        for e in ds.entries:
            assert e.path in out
        for e in ds.entries + ds.derived:  # a hash cut short can never match: catch it here
            assert re.fullmatch("[0-9a-f]{64}", e.sha256), e
            assert re.fullmatch("([0-9a-f]{32})?", e.md5) and re.fullmatch("([0-9a-f]{40})?", e.git)
    assert set(CATALOGUE) >= {"mnist", "fashion-mnist", "fsdd", "ptb", "kjv"}
    assert "kjv: " in out and "-> train.txt, valid.txt, test.txt" in out


def test_corrupt_download_is_refused_and_removed(tmp_path, server, toy):
    cat, files, _ = toy
    bad = bytearray(files["a.bin"])
    bad[123_456] ^= 1  # same size, one bit off
    server.files["toy/a.bin"] = bytes(bad)
    with pytest.raises(ChecksumError, match="a.bin: the download is corrupt .*sha256"):
        fetch("toy", tmp_path, catalogue=cat, base_url=server.url, log=lambda s: None)
    assert not (tmp_path / "toy" / "a.bin").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_folder_member_removes_the_staging_folder(tmp_path, server, toy):
    cat, _, _ = toy
    server.files["toy/rec/1_x_0.wav"] = payload(100, 99)
    with pytest.raises(ChecksumError, match="rec/: the download is corrupt"):
        fetch("toy", tmp_path, catalogue=cat, base_url=server.url, log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["a.bin", "b.bin"]


def test_cli_corrupt_download_is_one_line_exit_4(tmp_path, server, capsys, monkeypatch):
    """The real catalogue, its URLs pointed at the loopback server by the variable."""
    monkeypatch.setenv(BASE_URL_VAR, server.url)
    server.files["ptb/ptb.train.txt"] = b"not the penn treebank\n"
    assert main(["fetch", "ptb", "--out", str(tmp_path)]) == EXIT_CHECKSUM
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "ptb.train.txt" in err[0] and "corrupt" in err[0]
    assert list((tmp_path / "ptb").iterdir()) == []


def test_interrupted_download_resumes_with_range(tmp_path, server, toy):
    cat, files, _ = toy
    server.drop.add("toy/a.bin")
    with pytest.raises(NetworkError, match="closed after 150000 of 300000 bytes"):
        fetch("toy", tmp_path, catalogue=cat, base_url=server.url, retries=0,
              log=lambda s: None)
    part = tmp_path / "toy" / "a.bin.part"
    assert part.stat().st_size == 150_000 and not (tmp_path / "toy" / "a.bin").exists()
    logs = []
    fetch("toy", tmp_path, catalogue=cat, base_url=server.url, retries=0, log=logs.append)
    assert ("toy/a.bin", "bytes=150000-") in server.requests
    assert (tmp_path / "toy" / "a.bin").read_bytes() == files["a.bin"]
    assert any("resuming after 150000 bytes" in s for s in logs)
    assert leftovers(tmp_path) == []


def test_interruption_is_retried_within_one_run(tmp_path, server, toy):
    cat, files, _ = toy
    server.drop.update({"toy/a.bin", "toy/rec/0_y_0.wav"})
    fetch("toy", tmp_path, catalogue=cat, base_url=server.url, log=lambda s: None)
    assert ("toy/a.bin", "bytes=150000-") in server.requests
    assert ("toy/rec/0_y_0.wav", "bytes=3500-") in server.requests
    assert (tmp_path / "toy" / "a.bin").read_bytes() == files["a.bin"]


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, toy):
    cat, files, _ = toy
    server.ignore_range = True
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.bin.part").write_bytes(b"junk" * 1000)
    fetch("toy", tmp_path, catalogue=cat, base_url=server.url, log=lambda s: None)
    assert (tmp_path / "toy" / "a.bin").read_bytes() == files["a.bin"]


def test_files_put_by_hand_are_checked_not_replaced(tmp_path, server, toy):
    cat, files, members = toy
    dest = tmp_path / "toy"
    (dest / "rec").mkdir(parents=True)
    for name, data in members.items():
        (dest / "rec" / name).write_bytes(data)
    (dest / "a.bin").write_bytes(files["a.bin"])
    (dest / "b.bin").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="b.bin is not the published file"):
        fetch("toy", tmp_path, catalogue=cat, base_url=server.url, log=lambda s: None)
    assert (dest / "b.bin").read_bytes() == b"something else"  # never deletes the user's
    assert server.requests == []


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


@pytest.mark.parametrize("name,names", [
    ("ptb", "ptb.train.txt, ptb.valid.txt, ptb.test.txt"),
    ("fsdd", "recordings/ (the 3000 files 0_george_0.wav ... 9_yweweler_9.wav)")])
def test_offline_is_one_line_naming_where_to_put_files(tmp_path, capsys, monkeypatch, name,
                                                        names):
    monkeypatch.setenv(BASE_URL_VAR, f"http://127.0.0.1:{closed_port()}")
    rc = main(["fetch", name, "--out", str(tmp_path), "--retries", "0"])
    assert rc == EXIT_NETWORK == 3
    err = errors(capsys.readouterr().err)
    assert len(err) == 1, err
    assert f"put {names} in {tmp_path / name}/ by hand" in err[0]
    assert CATALOGUE[name].urls[0] in err[0] and "offline?" in err[0]
    assert not [p for p in (tmp_path / name).rglob("*") if p.is_file()]


def test_unknown_name_and_missing_out(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DBMPI_DATA", raising=False)
    assert main(["fetch", "cifar", "--out", str(tmp_path)]) == 2
    assert "unknown data set 'cifar'" in capsys.readouterr().err
    assert main(["fetch", "mnist"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["fetch", "--out", str(tmp_path)]) == 2
    assert "name the sets to fetch" in capsys.readouterr().err


def test_derived_files_are_made_checked_and_then_enough(tmp_path, server, toy):
    cat, files, _ = toy
    made = files["a.bin"][::-1] + files["b.bin"]
    ds = cat["toy"]
    good = DataSet(ds.name, ds.what, ds.licence, ds.urls, ds.hashes, ds.entries,
                   derived=(Entry("made.bin", hashlib.sha256(made).hexdigest(), len(made)),),
                   derive=lambda d: {"made.bin": (d / "a.bin").read_bytes()[::-1]
                                     + (d / "b.bin").read_bytes()})
    fetch("toy", tmp_path, catalogue={"toy": good}, base_url=server.url, log=lambda s: None)
    assert (tmp_path / "toy" / "made.bin").read_bytes() == made
    n = len(server.requests)
    fetch("toy", tmp_path, catalogue={"toy": good}, base_url=server.url, log=lambda s: None)
    assert len(server.requests) == n  # the made file checks: nothing is downloaded
    wrong = DataSet(ds.name, ds.what, ds.licence, ds.urls, ds.hashes, ds.entries,
                    derived=(Entry("made.bin", "0" * 64, len(made)),), derive=good.derive)
    shutil.rmtree(tmp_path / "toy")
    with pytest.raises(ChecksumError, match="made.bin: the download is corrupt"):
        fetch("toy", tmp_path, catalogue={"toy": wrong}, base_url=server.url,
              log=lambda s: None)
    assert not (tmp_path / "toy" / "made.bin").exists() and leftovers(tmp_path) == []


def test_kjv_split_by_chapter_one_verse_a_line(tmp_path):
    src = tmp_path / "aruljohn-Bible-kjv"
    src.mkdir()
    for i, book in enumerate(_BOOKS):
        chapters = [{"chapter": str(c), "verses": [
            {"verse": str(v), "text": f"{book} {c}:{v} God\u2019s word"} for v in (1, 2)]}
            for c in (1, 10, 20, 30, 40)] if i < 2 else []
        (src / book).write_text(json.dumps({"book": book, "chapters": chapters}))
    out = {k: v.decode().splitlines() for k, v in kjv_split(tmp_path).items()}
    assert out["test.txt"] == [f"{b} {c}:{v} God's word" for b in _BOOKS[:2]
                               for c in (20, 40) for v in (1, 2)]
    assert out["valid.txt"] == [f"{b} {c}:{v} God's word" for b in _BOOKS[:2]
                                for c in (10, 30) for v in (1, 2)]
    assert out["train.txt"] == ["Genesis.json 1:1 God's word", "Genesis.json 1:2 God's word",
                                "Exodus.json 1:1 God's word", "Exodus.json 1:2 God's word"]

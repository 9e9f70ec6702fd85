"""No tracked file names a path that only the machine it was written on has.

The rule (``bad_paths`` below applies it to one line of text):

* An *absolute path* is a ``/`` that starts a word (at the start of the line, or after a
  space, a quote, a backtick or one of ``( [ { = , : ;`` and ``|`` ``<``; not after a closing
  quote glued to a word, as in ``"$STATE"/log``), followed by a letter or ``_``, and then at
  least one more ``/`` before the word ends: a single name such as ``/tmp`` or the ``/s`` of
  ``GB/s`` is not a path. URLs, ``~/...``, ``$VAR/...`` and relative paths never are.
* An absolute path may start only with a standard system folder that every machine has and
  that the code really uses: ``/dev/``, ``/proc/``, ``/sys/``, ``/etc/``, ``/usr/``, ``/bin/``,
  ``/sbin/``, ``/lib/``, ``/lib64/``, ``/var/``, ``/run/``; or with ``/tmp/dbmpi`` (folders
  the project's own scripts create, such as the test SLURM cluster's). Anything else fails: a
  build machine's work or data folder, a home folder (under /home or /root), anything under
  /opt, /mnt or /scratch, any other file under /tmp.
* The ``datasets`` folder under /usr/share fails although it is under ``/usr/``: that is
  where one machine keeps its data, not a standard folder (commands write ``--src DIR``).
* An absolute path to a ``.whl`` file fails wherever it points (install by package name).
* The folder above this checkout (``Path(__file__).resolve().parents[2]``, so nothing here
  names it) fails wherever it appears, unless it is the root or one of the system folders.

Checked: every file ``git ls-files`` lists, except binary files (a NUL byte in the first
8 KiB: images, HDF5) and git's own pattern files (``.gitignore``: a leading ``/`` there means
the checkout's root). The checker itself is tested on synthetic good and bad lines, built by
concatenation so that this file passes its own check.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = Path(__file__).resolve().parents[2]

SYSTEM = ("/dev/", "/proc/", "/sys/", "/etc/", "/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/",
          "/var/", "/run/")
OWN_TMP = "/tmp" + "/dbmpi"
MACHINE_DATA = "/usr/share/" + "datasets"
GIT_PATTERN_FILES = {".gitignore", ".gitattributes", ".dockerignore"}

# A "/" that starts a word: line start or an opening character before it, and not a closing
# quote glued to the word before it ("$STATE"/log).
_START = r"""(?:^|(?<=[\s'"`(\[{=,:;|<]))(?<![\w})\]]["'`])"""
_WORD = r"""[^\s'"`(),:;|\]]"""  # what a path is made of: it ends at a space, quote, ...
_PATH = re.compile(_START + "/[A-Za-z_]" + _WORD + "*/" + _WORD + "*")
_WHEEL = re.compile(_START + "/" + _WORD + r"*\.whl\b")


def bad_paths(line: str, above: Path | str = ABOVE) -> list[str]:
    """The reasons ``line`` fails the rule in the module docstring (empty: it passes)."""
    found = []
    for m in _PATH.finditer(line):
        path = m.group(0)
        if path.startswith(MACHINE_DATA):
            found.append(f"{path}: one machine's data folder (write --src DIR)")
        elif not (path.startswith(SYSTEM) or path.startswith(OWN_TMP)):
            found.append(f"{path}: absolute path outside the standard system folders")
    for m in _WHEEL.finditer(line):
        found.append(f"{m.group(0)}: absolute path to a wheel (install by package name)")
    above = str(above).rstrip("/")
    if above and (above + "/") not in SYSTEM and above != "/tmp":
        for m in re.finditer(_START + re.escape(above) + r"(?![\w.-])", line):
            found.append(f"{above}: the folder above the checkout")
    return found


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): nothing tracked to check")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or Path(name).name in GIT_PATTERN_FILES or not path.is_file():
            continue
        with open(path, "rb") as f:
            if b"\0" in f.read(8192):
                continue  # binary
        files.append(path)
    return files


def test_no_tracked_file_names_a_machine_path():
    files = _tracked_text_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    # The scan really reads the files that matter (a scan of nothing would always pass).
    assert {"README.md", "pyproject.toml", "tests/test_hygiene.py"} <= names
    assert not any(n.endswith(".png") for n in names)
    failures = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for no, line in enumerate(text.splitlines(), 1):
            for why in bad_paths(line):
                failures.append(f"{path.relative_to(ROOT)}:{no}: {why}")
    assert not failures, "machine paths in tracked files:\n" + "\n".join(failures)


def ab(*parts: str) -> str:
    """An absolute path from its parts: the test lines below must not be paths in this file."""
    return "/" + "/".join(parts)


W = ab("work")
CI = ab("srv", "ci")  # a made-up folder above a checkout
BAD = [
    "python -m data_tools shard idx --src " + ab("work", "shared", "data", "fashion-mnist"),
    f'SRC = "{ab("work", "shared", "data", "kjv")}"',
    f"see `{ab('work', 'main', 'README.md')}`",
    "pip install " + ab("opt", "wheels", "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"),
    f"pip install {OWN_TMP}-x{ab('torch-2.13.0-cp311-none-any.whl')}  # even in an allowed place",
    f"cp model.h5 {ab('root', 'models')}{ab('')}",
    "--src " + ab("home", "alice", "data", "ptb"),
    "out=" + ab("tmp", "bench_jobs.0", "out"),
    "--src " + ab(MACHINE_DATA[1:], "fashion-mnist"),
    "PATH=/usr/bin:" + ab("scratch", "tools", "bin"),
    f"({ab('mnt', 'data', 'x')})",
]
GOOD = [
    "python -m data_tools shard idx --src DIR --out data/fmnist --shards 8",
    "rm -f /dev/shm/mpich_shm_*; cat /proc/self/maps; ls /etc/slurm/",
    "SLURM_DIR ?= " + OWN_TMP + "-slurm",
    'tail -n 5 "$STATE"/log/*.log',
    "python benchmarks/lm.py --src ~/ptb --name ptb",
    "$HOME/data/kjv and ${DBMPI_DATA}/kjv and $(pwd)/runs/x and @STATE@/munge/munge.socket",
    "bandwidth 19.4 GB/s, samples/s, n/a, and/or, 1/2",
    "https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion",
    'dir="/tmp" and prefix /tmp alone',
    "test -x /usr/sbin/slurmd",
    "pip install dist/dbmpi-0.1.0-py3-none-any.whl",
    "data/fmnist-images, runs/ae/params.h5, docs/speech.md",
]


@pytest.mark.parametrize("line", BAD)
def test_checker_flags_a_machine_path(line):
    assert bad_paths(line, above=CI), line


@pytest.mark.parametrize("line", GOOD)
def test_checker_passes_ordinary_text(line):
    assert bad_paths(line, above=CI) == []


def test_checker_flags_the_folder_above_the_checkout():
    assert bad_paths(f"cd {CI}{ab('other-checkout')} && make", above=CI)
    assert bad_paths(f'ROOT = "{CI}"', above=CI)
    # a longer name that starts with it is not it (but still no system folder)
    assert bad_paths(f"{CI}cada{ab('x')}", above=CI) == [
        f"{CI}cada{ab('x')}: absolute path outside the standard system folders"]
    # ... and the real one, wherever this checkout lives (a system folder is no "above").
    above = str(ABOVE)
    if above == "/" or above + "/" in SYSTEM or above == "/tmp":
        pytest.skip(f"this checkout's parent {above} is a system folder")
    assert any("folder above the checkout" in why
               for why in bad_paths(f"see {above}{ab('notes.txt')}"))


def test_a_bad_line_in_a_tracked_file_would_fail(tmp_path):
    """The scan's report for a file holding one bad line among good ones."""
    f = tmp_path / "notes.md"
    f.write_text("\n".join([GOOD[0], BAD[0], GOOD[1]]) + "\n")
    hits = [(no, why) for no, line in enumerate(f.read_text().splitlines(), 1)
            for why in bad_paths(line, above=CI)]
    assert [no for no, _ in hits] == [2]


# -- Markdown links ----------------------------------------------------------------------------
# Every relative link of a tracked Markdown file must point at a file of the checkout, and a
# #fragment at a heading of that file (GitHub's anchors: lower case, punctuation dropped,
# spaces to hyphens, -1, -2 ... for repeats).

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of ``markdown`` (headings in code blocks excluded)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    text = md.read_text(encoding="utf-8")
    bad = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or root not in (dest, *dest.parents):
            bad.append(f"{target}: no such file in the checkout")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text("utf-8")):
            bad.append(f"{target}: no heading #{frag} in {dest.name}")
    return bad


def test_markdown_links_resolve():
    mds = [p for p in _tracked_text_files() if p.suffix == ".md"]
    assert ROOT / "README.md" in mds
    failures = [f"{md.relative_to(ROOT)}: {why}" for md in mds for why in broken_links(md)]
    assert not failures, "broken links:\n" + "\n".join(failures)


def test_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n```sh\n# not a heading\n```\n## Why: it works\n")
    md = tmp_path / "README.md"
    md.write_text("[ok](docs/a.md) [ok](docs/a.md#why-it-works) [ok](https://example.org/x)\n"
                  "[gone](docs/b.md) [no anchor](docs/a.md#not-a-heading) [self](#nowhere)\n")
    assert broken_links(md, root=tmp_path) == [
        "docs/b.md: no such file in the checkout",
        "docs/a.md#not-a-heading: no heading #not-a-heading in a.md",
        "#nowhere: no heading #nowhere in README.md"]

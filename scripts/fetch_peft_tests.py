#!/usr/bin/env python
"""Fetch PEFT's generic tuner tests for the installed PEFT version into ``tests/upstream/peft_tests/``.

PEFT's wheels do not ship its test suite, so this script downloads the source distribution of exactly the
installed ``peft`` version with ``pip download`` and extracts the few test modules that
``tests/upstream/conftest.py`` runs against RankMoE. The destination is git-ignored; a ``VERSION`` marker
makes repeated runs a no-op until PEFT is upgraded.

Usage::

    python scripts/fetch_peft_tests.py            # fetch if missing or stale
    python scripts/fetch_peft_tests.py --force    # fetch again

Exit status: 0 on success (or nothing to do), 1 when the download or the extraction fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / "tests" / "upstream" / "peft_tests"
TEST_FILES: tuple[str, ...] = (
    "testing_common.py",
    "testing_utils.py",
    "test_custom_models.py",
    "test_config.py",
)
VERSION_FILE = "VERSION"
INIT_TEXT = '"""PEFT\'s own tests, fetched by scripts/fetch_peft_tests.py (git-ignored; do not edit)."""\n'
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """Raised when the sdist cannot be downloaded or does not contain the expected files."""


def installed_peft_version() -> str:
    """Return the version string of the installed ``peft`` distribution.

    Raises:
        FetchError: If ``peft`` is not installed in this interpreter.
    """
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError as exc:
        raise FetchError(f"peft is not installed in {sys.executable}; install it first") from exc


def is_up_to_date(dest: Path, version: str) -> bool:
    """Whether ``dest`` already holds every test file of ``version`` (per its ``VERSION`` marker)."""
    marker = dest / VERSION_FILE
    if not marker.is_file() or marker.read_text(encoding="utf-8").strip() != version:
        return False
    return all((dest / name).is_file() for name in (*TEST_FILES, "__init__.py"))


def download_sdist(version: str, download_dir: Path) -> Path:
    """Download the ``peft==version`` source distribution into ``download_dir`` with pip.

    Returns:
        Path of the downloaded archive.

    Raises:
        FetchError: If pip fails or saves no archive.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"peft=={version}", "-d", str(download_dir),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run {' '.join(command)}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise FetchError(
            f"could not download the source distribution of peft=={version} (is PyPI reachable?): "
            f"`{' '.join(command)}` failed with exit status {result.returncode}:\n{tail}"
        )
    archives = sorted(p for p in download_dir.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    if not archives:
        raise FetchError(f"pip reported success but saved no peft source archive in {download_dir}")
    return archives[0]


def read_test_files(archive: Path) -> dict[str, bytes]:
    """Read ``tests/<name>`` for every name in :data:`TEST_FILES` from an sdist archive.

    Members are matched as ``<top-level dir>/tests/<name>`` and read into memory, never extracted by path, so a
    malformed archive cannot write outside the destination.

    Raises:
        FetchError: If the archive cannot be read or lacks one of the files.
    """
    wanted = set(TEST_FILES)
    found: dict[str, bytes] = {}
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = _wanted_name(info.filename, wanted)
                    if name is not None and not info.is_dir():
                        found[name] = zf.read(info)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf.getmembers():
                    name = _wanted_name(member.name, wanted)
                    if name is not None and member.isfile():
                        handle = tf.extractfile(member)
                        if handle is not None:
                            found[name] = handle.read()
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise FetchError(f"cannot read {archive}: {exc}") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise FetchError(f"{archive.name} lacks tests/{', tests/'.join(missing)}; did PEFT move its tests?")
    return found


def _wanted_name(member_name: str, wanted: set[str]) -> str | None:
    """``name`` if ``member_name`` is ``<top>/tests/<name>`` with ``name`` in ``wanted``, else ``None``."""
    parts = member_name.replace("\\", "/").split("/")
    if len(parts) == 3 and parts[1] == "tests" and parts[2] in wanted:
        return parts[2]
    return None


def write_test_files(files: dict[str, bytes], dest: Path, version: str) -> None:
    """Replace the contents of ``dest`` with ``files``, an ``__init__.py`` and the ``VERSION`` marker.

    The files are written to a sibling temporary folder first and swapped in at the end, so an interrupted run
    never leaves a half-written folder with a valid marker.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp creates it private; the result is an ordinary folder
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / "__init__.py").write_text(INIT_TEXT, encoding="utf-8")
        (staging / VERSION_FILE).write_text(version + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fetch(dest: Path = DEFAULT_DEST, force: bool = False) -> bool:
    """Make sure ``dest`` holds the upstream test files of the installed PEFT version.

    Args:
        dest: Destination folder.
        force: Download even if the files of this version are already there.

    Returns:
        ``True`` if files were downloaded, ``False`` if they were already up to date.

    Raises:
        FetchError: If PEFT is missing, or the download or the extraction fails.
    """
    version = installed_peft_version()
    if not force and is_up_to_date(dest, version):
        return False
    with tempfile.TemporaryDirectory(prefix="peft-sdist-") as tmp:
        archive = download_sdist(version, Path(tmp))
        files = read_test_files(archive)
    write_test_files(files, dest, version)
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"destination folder (default: {DEFAULT_DEST})")
    parser.add_argument("--force", action="store_true", help="download even if the files are up to date")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        downloaded = fetch(args.dest, force=args.force)
    except FetchError as exc:
        print(f"fetch_peft_tests: error: {exc}", file=sys.stderr)
        return 1
    version = installed_peft_version()
    state = "fetched" if downloaded else "already present"
    print(f"fetch_peft_tests: PEFT {version} tests {state} in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

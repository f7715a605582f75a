"""Reading a local folder of pages: every file under a root with a wanted name ending."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pydantic import Field

from tasks.text.pages import Drop, Page, SourceError, iso_time
from tasks.text.settings import Settings


class FilesConfig(Settings):
    """A local folder of pages."""

    root: str = Field(..., min_length=1, description="Folder searched recursively; each file's URL is its file:// URI.")
    extensions: list[str] = Field(
        [".html", ".htm", ".txt"],
        min_length=1,
        description="File name endings read (case-insensitive); .txt is text/plain, the rest text/html.",
    )


def files_under(cfg: FilesConfig) -> list[Path]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise SourceError(str(root), "folder not found", "check files.root")
    endings = tuple(e.lower() for e in cfg.extensions)
    return sorted(p.resolve() for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(endings))


def read_files(paths: list[Path]) -> Iterator[Page | Drop]:
    for p in paths:
        try:
            body = p.read_bytes()
        except OSError as e:
            yield Drop(p.as_uri(), "unreadable_file", str(e))
            continue
        ctype = "text/plain" if p.suffix.lower() == ".txt" else "text/html"
        yield Page(p.as_uri(), iso_time(p.stat().st_mtime), None, ctype, None, body)

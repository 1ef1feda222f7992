"""Database and tracking URLs: SQLite files named as URLs, and URLs shown without their password."""

from __future__ import annotations

from pathlib import Path

SQLITE = "sqlite:///"


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy/MLflow URL of a SQLite file, absolute so that it means the same from any directory."""
    return SQLITE + str(Path(path).resolve())


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (``sqlite://`` too: SQLAlchemy's relative form); None for other URLs."""
    if url.startswith(SQLITE):
        return Path(url.removeprefix(SQLITE))
    if url.startswith("sqlite://"):
        return Path(url.removeprefix("sqlite://"))
    return None


def hide_password(url: str) -> str:
    """``url`` with any password replaced by ***, for logs and reports; unchanged when it is not a database URL."""
    import sqlalchemy  # only when a URL is shown: it is a heavy import for --help

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url  # e.g. an http:// tracking server

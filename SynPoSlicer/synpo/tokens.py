"""The token `synpo serve` asks every client for (all paths but /v1/health): made at random into a
file only its user may read, or read from the file the user gives (--token-file)."""
import os
import secrets
from typing import Optional

from .errors import SynPoError


def make_token_file(path: str) -> str:
    """A fresh random token written to `path`, readable by the user only; returns the token."""
    token = secrets.token_urlsafe(32)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp-%d" % os.getpid()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise SynPoError("cannot write the token file %s: %s" % (path, exc.strerror or exc)) from None
    return token


def reusable_token(path: str) -> Optional[str]:
    """The token already in `path` when another `synpo serve` wrote it there for this user (a file of
    this user's, which no one else may read or write, holding one token): servers started without
    --token-file on one machine share the default token file, so a second one keeps the token the
    first one's clients read (making a fresh one locked them out: 401). None: make a fresh one."""
    try:
        info = os.stat(path)
        if os.name == "posix" and (info.st_uid != os.getuid() or info.st_mode & 0o077):
            return None
        return read_token_file(path)
    except (OSError, SynPoError):
        return None


def read_token_file(path: str) -> str:
    try:
        with open(path) as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise SynPoError("cannot read the token file %s: %s" % (path, exc.strerror or exc)) from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() or ord(c) > 127 for c in token):
        # (printable ASCII, as clients take it: an HTTP header carries no other, so a UTF-8 token was
        # one no client could send, every request 401)
        raise SynPoError("the token file %s must hold one token of at least 16 printable ASCII characters, "
                         "without spaces" % path)
    return token

"""The portrait library: the photos the tray and `vasa-avatar run` can switch between.

Photos are copied into platformdirs' user_data_dir("vasa-avatar")/portraits ($VASA_AVATAR_DATA
overrides the data dir, for tests) and described in portraits/index.json (written atomically):
for each, the id, display name, stored file, source filename, when it was added and the answer to
the consent question. Adding a portrait needs that consent: clips of real people made without it
are the harm this tool invites (ARCHITECTURE.md §7).

The bundled astronaut (a public-domain NASA photo) is always the first entry and cannot be removed.
A stored photo that went missing or cannot be read is listed with a `problem` and skipped by
whoever needs a working portrait; it never breaks the list.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from avatar.errors import AvatarError
from avatar.settings import DEFAULT_PORTRAIT_ID, FRAMINGS, data_dir, read_json_or_set_aside, set_aside, \
    write_json_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 1
BUILTIN_PATH = Path(str(resources.files("avatar") / "assets" / "astronaut.png"))
BUILTIN_NAME = "Astronaut (bundled)"
CONSENT_REFUSED = "confirm you have the depicted person's consent (--i-have-consent)"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif")
MAX_ID_LENGTH = 40


@dataclass(frozen=True)
class Entry:
    """One portrait. `path` is the stored copy; `problem` says why it cannot be used (None: usable)."""

    id: str
    name: str
    path: Path
    source: str = ""  # the file name it was added from (no folder: that can say more than needed)
    added: str = ""  # ISO 8601, UTC
    consent: bool = False  # the user confirmed the depicted person's consent when adding it
    sha256: str = ""
    builtin: bool = False
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None


def portraits_dir() -> Path:
    return data_dir() / "portraits"


def builtin_entry() -> Entry:
    return Entry(id=DEFAULT_PORTRAIT_ID, name=BUILTIN_NAME, path=BUILTIN_PATH, source=BUILTIN_PATH.name,
                 consent=True, builtin=True, problem=_problem(BUILTIN_PATH))


# ---- the index --------------------------------------------------------------------------------

def _read_index(folder: Path) -> list[dict]:
    path = folder / INDEX_FILE
    data = read_json_or_set_aside(path, "portrait index")
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("portraits"), list):
        set_aside(path, "portrait index", "expected {\"portraits\": [...]}")
        return []
    return [p for p in data["portraits"] if isinstance(p, dict)]


def _write_index(folder: Path, records: list[dict]) -> None:
    write_json_atomic(folder / INDEX_FILE, {"version": INDEX_VERSION, "portraits": records})


def _record(entry: Entry) -> dict:
    rec = asdict(entry)
    rec["file"] = entry.path.name  # stored relative, so the data dir can move
    for key in ("path", "builtin", "problem"):
        rec.pop(key)
    return rec


def _entry(rec: dict, folder: Path) -> Entry | None:
    try:
        file = str(rec["file"])
        entry = Entry(id=str(rec["id"]), name=str(rec.get("name") or rec["id"]), path=folder / file,
                      source=str(rec.get("source", "")), added=str(rec.get("added", "")),
                      consent=rec.get("consent") is True, sha256=str(rec.get("sha256", "")))
    except (KeyError, TypeError):
        return None
    if Path(file).name != file or not entry.id:  # an index entry may only point inside the folder
        return None
    return replace(entry, problem=_problem(entry.path))


def _problem(path: Path) -> str | None:
    """Why the photo at `path` cannot be used, or None. Cheap: checks the header, not every pixel."""
    if not path.is_file():
        return f"photo file is missing ({path})"
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for damaged files
        return f"photo cannot be read ({' '.join(str(e).split()) or type(e).__name__})"
    return None


# ---- public API --------------------------------------------------------------------------------

def list_portraits() -> list[Entry]:
    """The bundled astronaut, then the added portraits in the order they were added. Entries whose
    photo is missing or damaged are included with `problem` set (and logged)."""
    folder = portraits_dir()
    entries = [builtin_entry()]
    for rec in _read_index(folder):
        entry = _entry(rec, folder)
        if entry is None:
            log.warning("portrait index %s: skipped an unreadable entry %r", folder / INDEX_FILE, rec)
            continue
        if entry.problem:
            log.warning("portrait %r: %s", entry.id, entry.problem)
        entries.append(entry)
    return entries


def get(portrait_id: str) -> Entry:
    """The entry with this id (AvatarError if there is none). It may have a `problem`."""
    for entry in list_portraits():
        if entry.id == portrait_id:
            return entry
    raise AvatarError(f"no portrait {portrait_id!r} in the library: have {', '.join(_ids())}")


def _ids() -> list[str]:
    return [e.id for e in list_portraits()]


def slug(text: str) -> str:
    """A short id from a name: lower case ASCII letters, digits and dashes."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:MAX_ID_LENGTH].strip("-")
    return s or "portrait"


def add_portrait(path: str | Path, *, consent: bool, name: str | None = None,
                 head_distance: float = FRAMINGS["medium"]) -> Entry:
    """Copy the photo at `path` into the library and return its entry.

    consent: the user confirmed they have the depicted person's consent; without it nothing is
    copied (AvatarError). The photo must show a usable face: it is analysed and its rig built and
    cached (for `head_distance`), so switching to it later is instant. Adding a photo that is
    already in the library returns the existing entry.
    """
    if consent is not True:
        raise AvatarError(CONSENT_REFUSED)
    src = Path(path).expanduser()
    if not src.is_file():
        raise AvatarError(f"no photo at {src}" if not src.exists() else f"{src} is not a file")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise AvatarError(f"cannot read {src}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    for entry in list_portraits():
        if entry.sha256 == digest and entry.usable:
            log.info("%s is already in the library as %r", src, entry.id)
            return entry

    folder = portraits_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = (name or src.stem).strip() or src.stem
    taken = set(_ids()) | {p.stem for p in folder.iterdir()}
    pid = base = slug(name)
    n = 2
    while pid in taken:
        pid, n = f"{base}-{n}", n + 1
    suffix = src.suffix.lower() if src.suffix.lower() in PHOTO_SUFFIXES else ".img"
    stored = folder / f"{pid}{suffix}"
    tmp = folder / f".{pid}{suffix}.adding"
    tmp.write_bytes(data)
    try:
        _check_face(tmp, head_distance)
        tmp.replace(stored)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    entry = Entry(id=pid, name=name, path=stored, source=src.name,
                  added=datetime.now(timezone.utc).isoformat(timespec="seconds"), consent=True, sha256=digest)
    records = _read_index(folder)
    records.append(_record(entry))
    try:
        _write_index(folder, records)
    except BaseException:
        stored.unlink(missing_ok=True)
        raise
    log.info("added portrait %r from %s", pid, src)
    return entry


def _check_face(path: Path, head_distance: float) -> None:
    """AvatarError unless the photo has a face the renderer can use. Builds and caches the rig
    (avatar/rig.py keys its cache by the image bytes, so the stored copy's rig is the one built)."""
    from avatar.rig import load_rig

    load_rig(path, head_distance=head_distance)


def remove_portrait(portrait_id: str) -> Entry:
    """Remove a portrait: its stored photo, its index entry and its cached rigs (they hold the
    framed photo too). Returns the removed entry. The bundled astronaut cannot be removed."""
    if portrait_id == DEFAULT_PORTRAIT_ID:
        raise AvatarError(f"the bundled portrait {DEFAULT_PORTRAIT_ID!r} cannot be removed")
    folder = portraits_dir()
    records = _read_index(folder)
    keep = [r for r in records if r.get("id") != portrait_id]
    if len(keep) == len(records):
        raise AvatarError(f"no portrait {portrait_id!r} in the library: have {', '.join(_ids())}")
    removed = [_entry(r, folder) for r in records if r.get("id") == portrait_id]
    _write_index(folder, keep)
    for entry in removed:
        if entry is None:
            continue
        _forget_rigs(entry.path)
        entry.path.unlink(missing_ok=True)
    log.info("removed portrait %r", portrait_id)
    return removed[0] if removed and removed[0] is not None else Entry(id=portrait_id, name=portrait_id,
                                                                       path=folder / portrait_id)


def _forget_rigs(photo: Path) -> None:
    """Delete the cached rigs built from this photo at the tray's framings (the common ones)."""
    from avatar.rig import rig_cache_dir, rig_cache_key

    try:
        data = photo.read_bytes()
    except OSError:
        return
    for distance in FRAMINGS.values():
        (rig_cache_dir() / f"{rig_cache_key(data, distance, None)}.pt").unlink(missing_ok=True)


def resolve(portrait_id: str) -> Entry:
    """The portrait to show for `portrait_id` (e.g. from the settings): that entry when it is usable,
    else the bundled one, with the reason logged. Never raises for a missing or damaged portrait."""
    try:
        entry = get(portrait_id)
    except AvatarError as e:
        log.warning("%s; using the bundled portrait", e)
        return builtin_entry()
    if entry.problem:
        log.warning("portrait %r: %s; using the bundled portrait", portrait_id, entry.problem)
        return builtin_entry()
    return entry

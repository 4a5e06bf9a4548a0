"""Settings persistence (atomic writes, damaged files set aside) and the portrait library (consent,
face check, broken photos listed with a problem, removal of the photo and its cached rigs).

Every test gets its own config and data folders ($VASA_AVATAR_CONFIG / $VASA_AVATAR_DATA) and the
session's private rig cache, so nothing touches the user's files.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatar import library
from avatar.controls import Controls
from avatar.errors import AvatarError
from avatar.rig import rig_cache_dir, rig_cache_key
from avatar.settings import EXPRESSIVENESS, FRAMINGS, Settings, load_settings, save_settings, settings_path, \
    write_json_atomic

FACES = Path(__file__).parent / "data" / "faces"
GRACE = FACES / "grace_hopper.jpg"


@pytest.fixture
def dirs(tmp_path, monkeypatch, rig_cache):
    config, data = tmp_path / "config", tmp_path / "data"
    monkeypatch.setenv("VASA_AVATAR_CONFIG", str(config))
    monkeypatch.setenv("VASA_AVATAR_DATA", str(data))
    return config, data


# ---- settings ------------------------------------------------------------------------------------

def test_settings_default_when_no_file(dirs):
    assert not settings_path().exists()
    assert load_settings() == Settings()
    assert settings_path() == dirs[0] / "settings.json"


def test_settings_round_trip_and_controls(dirs):
    s = Settings(portrait="grace-hopper", mood="sad", gaze="left", framing="close", expressiveness="high",
                 preview=True, mic="USB Audio", paused=True, badge=False)
    path = save_settings(s)
    assert json.loads(path.read_text())["mood"] == "sad"
    assert load_settings() == s
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temp file left behind
    c = s.to_controls()
    assert isinstance(c, Controls)
    assert (c.mood, c.gaze, c.head_distance, c.expressiveness) == ("sad", "left", 0.75, 1.6)
    assert Settings(framing="far", expressiveness="low").to_controls(seed=3) == \
        Controls(head_distance=1.35, expressiveness=0.5, seed=3)
    assert FRAMINGS == {"close": 0.75, "medium": 1.0, "far": 1.35}
    assert EXPRESSIVENESS == {"low": 0.5, "normal": 1.0, "high": 1.6}


def test_settings_reject_unknown_values():
    with pytest.raises(AvatarError, match="mood cannot be 'angry'.*neutral, happy"):
        Settings(mood="angry")
    with pytest.raises(AvatarError, match="framing"):
        Settings(framing="huge")
    with pytest.raises(AvatarError, match="paused"):
        Settings(paused="yes")


def test_atomic_write_keeps_the_old_file_when_writing_fails(dirs, monkeypatch):
    save_settings(Settings(mood="happy"))
    before = settings_path().read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            save_settings(Settings(mood="sad"))
    assert settings_path().read_bytes() == before
    assert [p.name for p in settings_path().parent.iterdir()] == ["settings.json"]
    with pytest.raises(TypeError):  # unserialisable data fails before the file is touched
        write_json_atomic(settings_path(), {"x": object()})
    assert settings_path().read_bytes() == before
    assert load_settings().mood == "happy"


def test_corrupt_settings_are_reported_once_and_kept_aside(dirs, caplog):
    path = settings_path()
    path.parent.mkdir(parents=True)
    garbage = b'{"mood": "happy", "gaze": '  # cut off mid-write by an older, non-atomic writer
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="avatar.settings"):
        assert load_settings() == Settings()
        assert load_settings() == Settings()
    warnings = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1
    assert (path.parent / "settings.json.bad").read_bytes() == garbage
    assert not path.exists()
    save_settings(Settings(mood="chill"))  # and saving works again
    assert load_settings().mood == "chill"


def test_settings_file_of_the_wrong_shape_is_set_aside(dirs):
    path = settings_path()
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2, 3]")
    assert load_settings() == Settings()
    assert (path.parent / "settings.json.bad").read_text() == "[1, 2, 3]"


def test_one_bad_value_falls_back_alone(dirs, caplog):
    path = settings_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"mood": "furious", "framing": "far", "preview": "yes", "future_key": 1}))
    with caplog.at_level(logging.WARNING, logger="avatar.settings"):
        s = load_settings()
    assert (s.mood, s.framing, s.preview) == ("neutral", "far", False)
    assert "mood, preview" in caplog.text
    assert path.exists()  # usable file: kept where it is


# ---- library -------------------------------------------------------------------------------------

def no_face_photo(path: Path) -> Path:
    y, x = np.mgrid[0:400, 0:300]
    Image.fromarray(np.dstack([x * 255 // 300, y * 255 // 400, np.full_like(x, 128)]).astype(np.uint8)).save(path)
    return path


def test_bundled_portrait_is_always_first(dirs):
    entries = library.list_portraits()
    assert [e.id for e in entries] == ["astronaut"]
    a = entries[0]
    assert a.builtin and a.usable and a.path.is_file()
    assert library.get("astronaut") == a
    with pytest.raises(AvatarError, match="cannot be removed"):
        library.remove_portrait("astronaut")


def test_add_refuses_without_consent(dirs):
    for answer in (False, None, "yes"):
        with pytest.raises(AvatarError) as e:
            library.add_portrait(GRACE, consent=answer)
        assert str(e.value) == "confirm you have the depicted person's consent (--i-have-consent)"
    assert not library.portraits_dir().exists()  # nothing copied
    assert [e.id for e in library.list_portraits()] == ["astronaut"]


def test_add_copies_checks_and_records(dirs):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    entry = library.add_portrait(GRACE, consent=True)
    assert entry.id == "grace-hopper" and entry.name == "grace_hopper"
    assert entry.path.parent == library.portraits_dir()
    assert entry.path.read_bytes() == GRACE.read_bytes()
    assert entry.consent and entry.source == "grace_hopper.jpg" and entry.usable
    assert before <= datetime.fromisoformat(entry.added) <= datetime.now(timezone.utc)
    # the rig was built and cached for the stored photo at the default framing
    assert (rig_cache_dir() / f"{rig_cache_key(GRACE.read_bytes(), 1.0, None)}.pt").is_file()
    index = json.loads((library.portraits_dir() / "index.json").read_text())
    (rec,) = index["portraits"]
    assert rec["consent"] is True and rec["file"] == entry.path.name and rec["source"] == "grace_hopper.jpg"
    assert [e.id for e in library.list_portraits()] == ["astronaut", "grace-hopper"]
    assert library.get("grace-hopper") == entry
    # the same photo again: the existing entry, no duplicate
    assert library.add_portrait(GRACE, consent=True, name="Grace again").id == "grace-hopper"
    # the same name, another photo: a new id
    other = library.portraits_dir().parent / "grace_hopper.png"
    Image.open(GRACE).save(other)
    assert library.add_portrait(other, consent=True).id == "grace-hopper-2"
    assert [e.id for e in library.list_portraits()] == ["astronaut", "grace-hopper", "grace-hopper-2"]


def test_add_refuses_a_photo_without_a_face(dirs, tmp_path):
    with pytest.raises(AvatarError, match="no face found"):
        library.add_portrait(no_face_photo(tmp_path / "wall.png"), consent=True)
    assert list(library.portraits_dir().iterdir()) == []  # no copy, no temp file, no index
    with pytest.raises(AvatarError, match="no photo at"):
        library.add_portrait(tmp_path / "missing.jpg", consent=True)


def test_broken_or_deleted_photos_are_listed_with_a_problem(dirs, caplog):
    entry = library.add_portrait(GRACE, consent=True, name="Grace Hopper")
    entry.path.write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="avatar.library"):
        listed = {e.id: e for e in library.list_portraits()}
    assert listed["grace-hopper"].problem.startswith("photo cannot be read")
    assert "grace-hopper" in caplog.text
    entry.path.unlink()
    listed = {e.id: e for e in library.list_portraits()}
    assert listed["grace-hopper"].problem.startswith("photo file is missing")
    assert listed["astronaut"].usable
    assert library.resolve("grace-hopper").id == "astronaut"  # falls back, does not raise
    assert library.resolve("no-such-id").id == "astronaut"
    assert library.resolve("astronaut").id == "astronaut"


def test_damaged_index_is_set_aside(dirs, caplog):
    folder = library.portraits_dir()
    folder.mkdir(parents=True)
    (folder / "index.json").write_text('{"portraits": [')
    with caplog.at_level(logging.WARNING):
        assert [e.id for e in library.list_portraits()] == ["astronaut"]
    assert (folder / "index.json.bad").read_text() == '{"portraits": ['
    # entries that point outside the folder or lack fields are skipped, the rest kept
    write_json_atomic(folder / "index.json", {"version": 1, "portraits": [
        {"id": "evil", "file": "../../etc/passwd"}, {"name": "no id"}, "junk",
        {"id": "ok", "file": "ok.png", "consent": True}]})
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    assert [e.id for e in library.list_portraits()] == ["astronaut", "ok"]


def test_remove_deletes_photo_index_entry_and_cached_rigs(dirs):
    entry = library.add_portrait(GRACE, consent=True)
    cached = rig_cache_dir() / f"{rig_cache_key(GRACE.read_bytes(), 1.0, None)}.pt"
    assert cached.is_file()
    removed = library.remove_portrait("grace-hopper")
    assert removed.id == "grace-hopper"
    assert not entry.path.exists() and not cached.exists()
    assert [e.id for e in library.list_portraits()] == ["astronaut"]
    with pytest.raises(AvatarError, match="no portrait 'grace-hopper'.*astronaut"):
        library.remove_portrait("grace-hopper")
    with pytest.raises(AvatarError, match="no portrait 'nobody'"):
        library.get("nobody")

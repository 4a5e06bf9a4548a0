"""Shared test set-up: quiet mediapipe, bounded torch threads, the `cuda` marker's skip, and the
session fixtures of the engine tests (a private rig cache, the astronaut's rig, 3 s of the bundled voice)."""

import os
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")
# tests never read or write the user's real settings, portrait library or install id
for _var in ("VASA_AVATAR_CONFIG", "VASA_AVATAR_DATA"):
    os.environ.setdefault(_var, tempfile.mkdtemp(prefix=f"{_var.lower()}-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rig_cache(tmp_path_factory):
    """A private rig cache so tests never read or pollute the user's cache."""
    path = tmp_path_factory.mktemp("rigs")
    os.environ["VASA_AVATAR_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def rig(rig_cache):
    """The astronaut's rig (engines.export.reference_rig: built where mediapipe is, else the saved one)."""
    from engines.export import reference_rig

    return reference_rig()


@pytest.fixture(scope="session")
def voice():
    """The first 3 s of the bundled voice: a (48000,) float32 tensor at 16 kHz."""
    from engines.export import read_voice

    return read_voice(seconds=3.0)

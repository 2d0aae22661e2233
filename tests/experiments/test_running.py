"""convexddn.experiments.running: writing results (the JSON whole or not at all)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convexddn.experiments.running import save_figure, write_json, write_result


def test_a_failed_write_keeps_the_previous_result(tmp_path):
    """The JSON was written in place: a write that failed half way (a value JSON cannot
    encode, as a float32 left in a result; Ctrl-C during json.dump alike) left a truncated,
    unparseable file where the previous run's result had been."""
    path = tmp_path / "run.json"
    write_json(str(path), {"a": 1.5, "rows": list(range(100))})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json(str(path), {"a": 2.0, "rows": list(range(100)), "bad": np.float32(1.0)})
    assert path.read_text() == before and json.loads(before)["a"] == 1.5
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left behind


def test_an_interrupted_write_keeps_the_previous_result(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json(str(path), {"a": 1})

    def interrupted(obj, f, **kwargs):
        f.write('{"a": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["run.json"]


def test_an_interrupted_figure_keeps_the_previous_plot(tmp_path):
    """The PNG beside a result (pointcloud, projection, bench) was written in place by savefig:
    a full disk or Ctrl-C half way left a truncated plot over the previous run's (a tester: 2 of
    40 random interrupts), where the JSON beside it is written whole or not at all."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "run.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, str(path))
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG") and before.endswith(b"IEND\xaeB`\x82")

    class Interrupted:  # a figure whose save stops half way
        def savefig(self, f, **kwargs):
            f.write(before[:100])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_figure(Interrupted(), str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.png"]  # no temporary file left behind
    plt.close(fig)


def test_write_result_writes_the_json_then_the_plot(tmp_path):
    seen = []
    files = write_result({"x": 1}, str(tmp_path), "demo", lambda result, png: seen.append((result, png)))
    assert json.loads(open(files["json"]).read()) == {"x": 1, "files": files}
    assert seen == [({"x": 1}, files["png"])]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_json_gets_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp creates its file 0600 and the rename kept it: every result JSON came out
    unreadable to group and others whatever the umask (the PNG beside it 0644), and an
    existing 0644 file turned 0600. A new file now gets 0666 less the umask, an existing
    one keeps its mode, as with open(path, "w")."""
    import stat

    new = tmp_path / "new.json"
    write_json(str(new), {"a": 1})
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~_umask()
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    existing.chmod(0o640)
    write_json(str(existing), {"a": 2})
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and json.loads(existing.read_text()) == {"a": 2}


def test_json_mode_follows_the_umask_now(tmp_path):
    """The umask in force at the write counts (the kernel applies it to the new file), not one
    read at import."""
    import stat

    before = os.umask(0o027)
    try:
        path = tmp_path / "run.json"
        write_json(str(path), {"a": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(before)

"""What the four method files' bad-input tests share. A bad input ends the run with exit code 2 and one line on
stderr, no traceback, before any model loads, and the earlier run in --out stays as it was; each test file keeps
its own matrix of bad inputs and the words its error line must hold."""
import hashlib
import shutil

import imageio.v3 as iio
import pytest
import torch

import common
import toyworld as tw

SUBJ, MOT = tw.ASSETS / "toy" / "subject", tw.ASSETS / "toy" / "motion"  # the bundled toy inputs


def error_line(method, argv, capsys, warnings=False):
    """method.main(argv), run as its command line runs it (common.cli), must exit with code 2 and print one line,
    'error: ...' (after 'warning: skipping' lines about bad records, where `warnings`) -> that line."""
    with pytest.raises(SystemExit) as e:
        common.cli(method.main, argv)
    *before, err = capsys.readouterr().err.splitlines() or [""]
    assert e.value.code == 2 and err.startswith("error: "), err
    assert all(w.startswith("warning: skipping") for w in before) if warnings else not before, before
    return err


def check_bad_input(method, argv, words, checksum, capsys, monkeypatch, warnings=False):
    """The bad input in argv ends the run with one short line holding `words` (error_line), no model is loaded, and
    `checksum` (of --out, see earlier_run) is the same after as before."""
    monkeypatch.setattr(method, "load_models", lambda *a: pytest.fail("a model was loaded"))
    before = checksum()
    err = error_line(method, argv, capsys, warnings)
    assert words in err and len(err) < 400, err
    assert checksum() == before


def earlier_run(folder, names):
    """--out holding an earlier run: a stand-in file for each of `names` (so --resume and --sample-only find them
    damaged) -> a function giving the checksum of every file in it, names included."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    return lambda: hashlib.sha256(b"".join(str(q.relative_to(folder)).encode() + q.read_bytes()
                                           for q in sorted(folder.rglob("*")) if q.is_file())).hexdigest()


# bad files for the matrices: each helper makes one under the test's tmp folder t and returns its path


def png(height, width):
    return iio.imwrite("<bytes>", common.to_uint8(torch.zeros(3, height, width)), extension=".png")


def copy_of(t, src, changes):
    """A copy of a toy input folder under t with some files replaced ({name: bytes}) or deleted ({name: None})."""
    dst = t / f"input{len(list(t.iterdir()))}"
    shutil.copytree(src, dst)
    for name, data in changes.items():
        (dst / name).unlink() if data is None else (dst / name).write_bytes(data)
    return str(dst)


def empty_dir(t, name="empty"):
    (t / name).mkdir(exist_ok=True)
    return str(t / name)


def put_file(t, name, data):
    (t / name).write_bytes(data)
    return str(t / name)


def with_ckpt(out, state):
    """out/ckpt.pt replaced by `state` (before the checksum is taken) -> the flag that reads it."""
    torch.save(state, out / "ckpt.pt")
    return ["--resume"]

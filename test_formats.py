"""Tests of formats.py: atomic writes (the safetensors reader and writer are tested in test_bert.py,
test_errors.py and test_interop.py, the PEFT adapter folder in test_interop.py)."""
import os

import pytest
import torch

import formats


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    formats.atomic_write(path, b"old")
    assert path.read_bytes() == b"old"
    formats.atomic_write(str(path), "λ")  # str: UTF-8
    assert path.read_bytes() == "λ".encode()
    # a callable writes into the file
    formats.atomic_write(path, lambda f: torch.save({"a": torch.ones(2)}, f))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))

    def disk_full(f):
        f.write(b"partial")
        raise OSError("disk full")

    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    for writer, error in ((disk_full, OSError), (interrupted, KeyboardInterrupt)):
        with pytest.raises(error):
            formats.atomic_write(path, writer)
        assert torch.equal(torch.load(path)["a"], torch.ones(2))  # the previous file is untouched
        assert os.listdir(tmp_path) == ["f.bin"]  # and the temporary file is gone
    with pytest.raises(TypeError, match="data must be bytes, str or a callable"):
        formats.atomic_write(path, 5)

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: replaced.append(src) or real_replace(src, dst))
    formats.atomic_write(path, b"a")
    formats.atomic_write(path, b"b")
    # beside the target: one file system
    assert [os.path.dirname(src) for src in replaced] == [str(tmp_path)] * 2
    # unique names
    assert replaced[0] != replaced[1] and all(f".{os.getpid()}." in src for src in replaced)

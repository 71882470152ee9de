"""Fuzzing the checkpoint, index and mask readers with malformed files (hypothesis).

Every malformed input must end in the project's error type (one line naming the file), never
in another exception, a crash or a hang; a whole read of every tensor must then succeed or
raise the same error type.
"""

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpift_dist.analysis.masks import MaskFile
from cpift_dist.errors import CpiftError
from cpift_dist.io import Checkpoint
from cpift_dist.io.checkpoint import CheckpointReader

pytestmark = pytest.mark.timeout(240)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

_dtype = st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "F64", "X9", "", 7])
_shape = st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just("x"),
                   st.lists(st.integers(2 ** 40, 2 ** 62), min_size=1, max_size=2))
_offsets = st.one_of(st.tuples(st.integers(-4, 80), st.integers(-4, 80)).map(list),
                     st.just([0]), st.just("0-4"))
_entry = st.fixed_dictionaries({"dtype": _dtype, "shape": _shape, "data_offsets": _offsets})
_header = st.one_of(
    st.dictionaries(st.text("abcw.", min_size=1, max_size=6), _entry, max_size=3),
    st.dictionaries(st.text("abc", min_size=1, max_size=3),
                    st.one_of(st.integers(), st.text(max_size=4), st.none()), max_size=3))


def _file(header: object, body: bytes, declared: int | None, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    h = json.dumps(header).encode()
    n = len(h) if declared is None else declared
    return struct.pack("<Q", n % 2 ** 64) + h + body


def _read_all(ck: Checkpoint) -> None:
    r = CheckpointReader(ck)
    for name in ck.names():
        info = ck.info(name)
        r.read_rows(name, 0, max(1, info.rows))


@FUZZ
@given(header=_header, body=st.binary(max_size=96),
       declared=st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_malformed_safetensors_raise_the_project_error(header, body, declared, raw):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(_file(header, body, declared, raw))
        try:
            _read_all(Checkpoint(d))
        except CpiftError as e:
            assert "\n" not in str(e) and d in str(e)


_index = st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(
        st.text("abw.", min_size=1, max_size=5),
        st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "b.safetensors",
                         "", "sub/../a.safetensors", 3]), max_size=3)}),
    st.dictionaries(st.text("wm", max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2))


@FUZZ
@given(index=_index, raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_malformed_index_files_raise_the_project_error(models, index, raw):
    with tempfile.TemporaryDirectory() as d:
        src = Checkpoint(models["base"])
        first = sorted({i.file for i in src.tensors.values()})[0]
        (Path(d) / "a.safetensors").write_bytes(first.read_bytes())
        (Path(d) / "model.safetensors.index.json").write_bytes(
            raw if raw is not None else json.dumps(index).encode())
        try:
            ck = Checkpoint(d)
            assert all(i.file.parent == Path(d) for i in ck.tensors.values())
            _read_all(ck)
        except CpiftError as e:
            assert "\n" not in str(e)


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["format", "tensors", "task", "p"]),
                            st.one_of(st.just("cpift-core-mask/1"), st.text(max_size=8),
                                      st.just('{"w": {"numel": 9, "shape": [3, 3]}}'),
                                      st.just('{"w": {"numel": -1}}')), max_size=4),
       tensors=st.dictionaries(st.sampled_from(["w", "v"]),
                               st.tuples(st.sampled_from(["U8", "F32"]), st.integers(0, 4)),
                               max_size=2),
       cut=st.integers(0, 64))
@example(meta={"tensors": "0", "format": "cpift-core-mask/1"}, tensors={}, cut=0)  # a number:
@example(meta={"tensors": "[1]", "format": "cpift-core-mask/1"}, tensors={}, cut=0)  # found
def test_malformed_mask_files_raise_the_project_error(meta, tensors, cut):  # by a CI run
    header, off = {"__metadata__": meta}, 0
    for name, (dt, n) in tensors.items():
        size = n * (1 if dt == "U8" else 4)
        header[name] = {"dtype": dt, "shape": [n], "data_offsets": [off, off + size]}
        off += size
    data = _file(header, b"\xff" * off, None, None)
    data = data[:len(data) - cut] if cut else data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        try:
            m = MaskFile(path)
            for n in m.names():
                m.read(n)
        except CpiftError as e:
            assert "\n" not in str(e) and str(path) in str(e)

"""``mtkit.fileio``: the one line reader (line endings, the invalid-UTF-8 policies, gzip, stdin)
and the one atomic writer."""

import gzip
import io
import os
import sys

import pytest

from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_bytes, atomic_writer, open_output, read_line_chunks, read_lines

RAW = b"a\r\nb\n\xff c\nd\re\nlast\r"


def test_line_endings_and_invalid_utf8_policies(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(RAW)
    with pytest.raises(MtkitError, match=r"a.txt:3: not valid UTF-8 \(byte 0\); set data.invalid_utf8=skip"):
        list(read_lines(path))
    # Split on LF only: CRLF reads like LF, a CR inside a line stays.
    assert list(read_lines(path, "skip")) == ["a", "b", None, "d\re", "last"]
    warned: list[str] = []
    assert list(read_lines(path, "replace", warn=warned.append)) == ["a", "b", "\ufffd c", "d\re", "last"]
    assert warned == [f"{path}:3: invalid UTF-8 (byte 0) replaced with U+FFFD"]
    with pytest.raises(ValueError, match="invalid_utf8"):
        read_lines(path, "ignore")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_line_chunks_are_read_lines_in_lists(tmp_path, monkeypatch, size):
    # What prepare reads: the same lines, policies and errors, a chunk decoded at a time.
    path, packed = tmp_path / "a.txt", tmp_path / "a.gz"
    path.write_bytes(RAW + b"\nx\n")
    packed.write_bytes(gzip.compress(RAW))
    for source in (path, packed):
        for policy in ("skip", "replace"):
            chunks = list(read_line_chunks(source, size, policy, warn=lambda line: None))
            assert all(len(chunk) == size for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= size
            assert sum(chunks, []) == list(read_lines(source, policy, warn=lambda line: None))
        with pytest.raises(MtkitError, match=r"a.(txt|gz):3: not valid UTF-8 \(byte 0\); set data.invalid_utf8"):
            list(read_line_chunks(source, size))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\r\ny\nz")))
    assert sum(read_line_chunks("-", size), []) == ["x", "y", "z"]
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(b"kato rimu\n" * 5000)[:-40])
    with pytest.raises(MtkitError, match="cut.gz: unreadable input after line"):
        list(read_line_chunks(cut, size, what="input"))
    (tmp_path / "empty.txt").write_bytes(b"")
    assert list(read_line_chunks(tmp_path / "empty.txt", size)) == []


def test_gzip_stdin_and_unreadable_files(tmp_path, monkeypatch):
    import io
    import sys

    packed = tmp_path / "a.gz"
    packed.write_bytes(gzip.compress(RAW))
    assert list(read_lines(packed, "skip")) == ["a", "b", None, "d\re", "last"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\r\n\xc3\n")))
    with pytest.raises(MtkitError, match=r"^<stdin>:2: not valid UTF-8 \(byte 0\)$"):
        list(read_lines("-", hint=""))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(b"kato rimu\n" * 5000)[:-40])
    with pytest.raises(MtkitError, match="cut.gz: unreadable input after line"):
        list(read_lines(cut, what="input"))
    with pytest.raises(MtkitError, match="file not found"):
        read_lines(tmp_path / "missing")  # opened at the call, not at the first line
    fake = tmp_path / "fake.gz"
    fake.write_bytes(b"plain")
    with pytest.raises(MtkitError, match="not a gzip file"):
        read_lines(fake)


def test_atomic_writer_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("previous\n")
    with pytest.raises(KeyboardInterrupt), atomic_writer(out) as sink:
        sink.write(b"half")
        sink.flush()
        assert [p.name for p in tmp_path.glob(".out.txt.*.tmp")]  # streamed beside the target
        raise KeyboardInterrupt
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["out.txt"]
    with open_output(str(out)) as sink:
        sink.write(b"new\n")
    assert out.read_text() == "new\n"
    with pytest.raises(MtkitError, match=f"^{tmp_path}: cannot write: "):
        atomic_write_bytes(tmp_path, b"into a directory")
    assert os.listdir(tmp_path) == ["out.txt"]


def test_pipe_lines_arrive_as_written_and_ready_waits(monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(open(read_end, "rb")))  # noqa: SIM115 - closed below
    warned: list[str] = []
    lines = read_lines("-", "replace", warn=warned.append)
    assert lines.streaming and not lines.ready(0.0)
    os.write(write_end, b"a\r\nb")
    assert next(lines) == "a"  # CRLF dropped, as from a file
    assert not lines.ready(0.05)  # "b" has no line end yet: not a line
    os.write(write_end, b"\n\xff c\n")
    assert lines.ready(0.0) and next(lines) == "b"
    assert next(lines) == "\ufffd c" and warned == ["<stdin>:3: invalid UTF-8 (byte 0) replaced with U+FFFD"]
    os.write(write_end, b"last")
    os.close(write_end)
    assert lines.ready(5.0)  # the end of the input counts as ready
    assert list(lines) == ["last"]
    sys.stdin.close()


def test_files_never_pause(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(RAW)
    lines = read_lines(path, "skip")
    assert not lines.streaming and lines.ready(0.0)


def test_named_pipe_reads_as_it_arrives(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer first, so that opening for reading does not block
    try:
        os.write(writer, b"first\n")  # opening peeks at the first bytes (gzip or not)
        lines = read_lines(fifo)
        assert lines.streaming and not lines.terminal
        assert next(lines) == "first" and not lines.ready(0.05)
        os.write(writer, b"second\n")
        assert lines.ready(5.0) and next(lines) == "second"
    finally:
        os.close(writer)

"""Feed the ``pytest-convergence`` command hostile and damaged snapshot files; print what it did.

Every case builds its file(s) in a fresh folder and runs one command on them in a forked child
whose stdout and stderr are files, so warnings printed by libraries, tracebacks and the exit
status are what a user's terminal would show. A child gets 60 s and 2 GiB of address space
beyond what the parent holds, so a file that declares a huge tensor cannot take the machine
down. Pickles that would run code try to create a marker file; the table says if one did.

    OMP_NUM_THREADS=1 python scripts/hostile_inputs.py            # a table for a terminal
    OMP_NUM_THREADS=1 python scripts/hostile_inputs.py --markdown # the table of
                                                                  # docs/reliability.md

Exit status 1 when any case printed a traceback, more than one line on stderr with exit 2, ran
code, or was killed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

import pytest_convergence as pc  # noqa: E402
from pytest_convergence.cli import main  # noqa: E402

TIMEOUT_S = 60
EXTRA_ADDRESS_SPACE = 2 << 30
MARKER = "CODE-RAN"


@dataclass(frozen=True)
class Case:
    kind: str
    description: str
    build: Callable[[Path], list[str]]  # makes the files in the folder, returns the arguments


@dataclass(frozen=True)
class Outcome:
    status: str  # an exit status, "timeout" or "killed by SIGxxx"
    stdout: str
    stderr: str
    ran_code: bool
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def verdict(self) -> str:
        lines = self.stderr.splitlines()
        if self.ran_code:
            return "RAN CODE"
        if self.traceback:
            return "TRACEBACK"
        if not self.status.isdigit():
            return self.status.upper()
        if self.status == "2":
            one_line = len(lines) == 1 and lines[0].startswith("pytest-convergence ")
            return "refused, one line" if one_line else f"refused, {len(lines)} lines on stderr"
        if self.status == "0":
            return "read" if not lines else f"read, {len(lines)} lines on stderr"
        return f"exit {self.status}"

    @property
    def bad(self) -> bool:
        """Code ran, a traceback, a kill, or more than our one line on stderr. Exit 1 without
        a traceback is ``check`` finding a snapshot outside its region."""
        return self.verdict not in ("read", "refused, one line", "exit 1")

    @property
    def summary(self) -> str:
        text = self.stderr.strip() or self.stdout.strip()
        first = text.splitlines()[0] if text else ""
        first = first.replace("pytest-convergence ", "", 1).split(" (supported formats")[0]
        return first if len(first) <= 150 else first[:147] + "..."


# --- building files -----------------------------------------------------------------------------

WEIGHTS = {"w": torch.arange(1.0, 7.0).reshape(2, 3), "b": torch.tensor([0.5, -2.0])}
SUFFIXES = (".pt", ".safetensors", ".npz", ".onnx")


def saved(name: str, weights: dict[str, torch.Tensor] | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return pc.save_snapshot(WEIGHTS if weights is None else weights, folder / name)

    return build


def logm(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda folder: ["logm", str(make(folder))]


def raw(name: str, content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return build


def truncated(name: str, keep: Callable[[int], int]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = saved(name)(folder)
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])
        return path

    return build


def flipped(name: str) -> Callable[[Path], Path]:
    """Every 7th byte of the second half inverted: damage past the header."""

    def build(folder: Path) -> Path:
        path = saved(name)(folder)
        data = bytearray(path.read_bytes())
        for index in range(len(data) // 2, len(data), 7):
            data[index] ^= 0xFF
        path.write_bytes(bytes(data))
        return path

    return build


def another_format(name: str, source_suffix: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        source = saved(f"source{source_suffix}")(folder)
        (folder / name).write_bytes(source.read_bytes())
        return folder / name

    return build


class RunsCode:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.folder / MARKER,))


def code_pickle(name: str, how: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        payload = {"w": torch.ones(2), "x": RunsCode(folder)}
        if how == "zip":
            torch.save(payload, path)
        elif how == "legacy":
            torch.save(payload, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=int(how)))
        return path

    return build


def os_system_pickle(name: str) -> Callable[[Path], Path]:
    """A hand-written protocol-2 pickle calling os.system, as exploit write-ups show."""

    def build(folder: Path) -> Path:
        command = f"touch {folder / MARKER}".encode()
        data = (
            b"\x80\x02cposix\nsystem\nq\x00X"
            + struct.pack("<I", len(command))
            + command
            + b"q\x01\x85q\x02Rq\x03."
        )
        (folder / name).write_bytes(data)
        return folder / name

    return build


def torch_saved(name: str, payload: object, **kwargs: object) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        torch.save(payload, folder / name, **kwargs)  # type: ignore[arg-type]
        return folder / name

    return build


def deeply_nested(name: str, depth: int) -> Callable[[Path], Path]:
    """A state dict ``depth`` dicts deep; torch.save needs a raised recursion limit for it,
    torch.load's weights-only unpickler does not."""

    def build(folder: Path) -> Path:
        state: dict[str, object] = {"w": torch.ones(2)}
        for _ in range(depth):
            state = {"n": state}
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10 * depth))
        try:
            torch.save(state, folder / name)
        finally:
            sys.setrecursionlimit(limit)
        return folder / name

    return build


def npz_of(name: str, **arrays: object) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        np.savez(folder / name, **arrays)  # type: ignore[arg-type]
        return folder / name

    return build


def npz_declaring(name: str, shape: tuple[int, ...], dtype: str = "<f8") -> Callable[[Path], Path]:
    """An .npy member whose header declares ``shape`` and holds 16 bytes, deflated."""

    def build(folder: Path) -> Path:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": dtype, "fortran_order": False, "shape": shape}
        )
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("w.npy", header.getvalue() + bytes(16))
        return folder / name

    return build


def npz_bomb(name: str) -> Callable[[Path], Path]:
    """1 GiB of zeros, declared honestly, deflated to about 1 MB."""

    def build(folder: Path) -> Path:
        header = io.BytesIO()
        count = 1 << 28
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (count,)}
        )
        block = bytes(1 << 24)
        with (
            zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as archive,
            archive.open("w.npy", "w", force_zip64=True) as handle,
        ):
            handle.write(header.getvalue())
            for _ in range(count * 4 // len(block)):
                handle.write(block)
        return folder / name

    return build


def npz_duplicate_members(name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            with zipfile.ZipFile(folder / name, "w") as archive:
                for value in (1.0, 2.0):
                    buffer = io.BytesIO()
                    np.save(buffer, np.full(3, value, dtype=np.float32))
                    archive.writestr("w.npy", buffer.getvalue())
        return folder / name

    return build


def safetensors_header(name: str, header: object, data: bytes = b"") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        text = json.dumps(header).encode()
        (folder / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
        return folder / name

    return build


def safetensors_header_length(name: str, length: int) -> Callable[[Path], Path]:
    return raw(name, struct.pack("<Q", length) + b"{}")


def onnx_of(name: str, *initializers: TensorProto) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        graph = helper.make_graph([], "weights", [], [], initializer=list(initializers))
        (folder / name).write_bytes(helper.make_model(graph).SerializeToString())
        return folder / name

    return build


def onnx_tensor(
    dims: tuple[int, ...], raw_data: bytes = b"", kind: int = TensorProto.FLOAT
) -> TensorProto:
    proto = TensorProto(name="w", data_type=kind, dims=dims)
    proto.raw_data = raw_data
    return proto


def onnx_external(location: str, length: int | None = None, offset: int = 0) -> TensorProto:
    proto = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=(4,))
    proto.data_location = TensorProto.EXTERNAL
    proto.external_data.add(key="location", value=location)
    proto.external_data.add(key="offset", value=str(offset))
    if length is not None:
        proto.external_data.add(key="length", value=str(length))
    return proto


def onnx_external_to(target: Callable[[Path], Path], location: str) -> Callable[[Path], Path]:
    """An ONNX model whose external data is ``location``, made by ``target`` in the folder."""

    def build(folder: Path) -> Path:
        target(folder)
        return onnx_of("m.onnx", onnx_external(location))(folder)

    return build


def symlink(name: str, to: Callable[[Path], str]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).symlink_to(to(folder))
        return folder / name

    return build


def fifo(name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        os.mkfifo(folder / name)
        return folder / name

    return build


def folder_named(name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).mkdir()
        return folder / name

    return build


def pt_with_short_storage(name: str) -> Callable[[Path], Path]:
    """A zip checkpoint whose tensor's storage file was cut to half its bytes."""

    def build(folder: Path) -> Path:
        source = torch_saved("source.pt", {"w": torch.ones(64)})(folder)
        with zipfile.ZipFile(source) as old, zipfile.ZipFile(folder / name, "w") as new:
            for member in old.infolist():
                data = old.read(member)
                if member.filename.endswith("/data/0"):
                    data = data[: len(data) // 2]
                new.writestr(member, data)
        return folder / name

    return build


def two(
    make_a: Callable[[Path], Path], make_b: Callable[[Path], Path], *args: str
) -> Callable[[Path], list[str]]:
    return lambda folder: [*args[:1], str(make_a(folder)), str(make_b(folder)), *args[1:]]


NAN = float("nan")
INF = float("inf")
PER_FORMAT: list[tuple[str, str, dict[str, torch.Tensor]]] = [
    ("values", "no tensors at all", {}),
    ("values", "a zero-dim tensor", {"t": torch.tensor(3.0)}),
    ("values", "a zero-element tensor", {"e": torch.empty(0, 4)}),
    ("values", "all weights zero", {"z": torch.zeros(3)}),
    ("values", "NaN weights", {"w": torch.tensor([1.0, NAN])}),
    ("values", "Inf weights", {"w": torch.tensor([1.0, INF])}),
    ("values", "subnormal float16 weights", {"w": torch.tensor([6e-8, 1e-5]).half()}),
    ("dtypes", "integer and bool tensors only", {"i": torch.arange(3), "b": torch.ones(2) > 0}),
    ("dtypes", "float8_e4m3fn weights", {"w": torch.ones(4).to(torch.float8_e4m3fn)}),
    ("dtypes", "bfloat16 weights", {"w": torch.ones(4, dtype=torch.bfloat16)}),
]


def format_cases() -> list[Case]:
    """The same damage and the same odd values in every format."""
    found = []
    noise = np.random.default_rng(0).bytes(4096)
    for suffix in SUFFIXES:
        name = f"m{suffix}"
        other = SUFFIXES[(SUFFIXES.index(suffix) + 1) % len(SUFFIXES)]
        damaged: list[tuple[str, Callable[[Path], Path]]] = [
            ("empty file", raw(name, b"")),
            ("cut to half", truncated(name, lambda n: n // 2)),
            ("cut to 10 bytes", truncated(name, lambda n: 10)),
            ("last byte cut", truncated(name, lambda n: n - 1)),
            ("bytes flipped past the header", flipped(name)),
            ("4 KiB of random bytes", raw(name, noise)),
            ("a text file", raw(name, b"hello, world\n")),
            (f"a {other} file under this suffix", another_format(name, other)),
        ]
        found += [Case("damaged", f"{suffix}: {what}", logm(make)) for what, make in damaged]
        found += [
            Case(kind, f"{suffix}: {what}", logm(saved(name, weights)))
            for kind, what, weights in PER_FORMAT
        ]
    return found


def dtype_cases() -> list[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        quantized = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    odd_arrays = {
        "w": np.ones(2, dtype=np.float32),
        "s": np.array(["a"]),
        "d": np.array(["2020-01-01"], dtype="datetime64[D]"),
        "r": np.zeros(2, dtype=[("x", "f4")]),
    }
    onnx_odd = (
        helper.make_tensor("s", TensorProto.STRING, (1,), [b"x"]),
        TensorProto(name="u", data_type=TensorProto.UNDEFINED, dims=(1,)),
    )
    objects = {"w": np.ones(2, dtype=np.float32), "o": np.array([object()], dtype=object)}
    made: list[tuple[str, Callable[[Path], Path]]] = [
        (".pt: complex weights", torch_saved("c.pt", {"w": torch.ones(2, dtype=torch.cfloat)})),
        (".npz: complex weights", npz_of("c.npz", w=np.ones(2, dtype=np.complex64))),
        (".npz: float128 (long double) weights", npz_of("l.npz", w=np.ones(2, np.longdouble))),
        (".npz: string, datetime and record arrays", npz_of("s.npz", **odd_arrays)),
        (".npz: big-endian float32", npz_of("be.npz", w=np.ones(3, dtype=">f4"))),
        (".npz: an object array (pickled)", npz_of("o.npz", **objects)),
        (".onnx: STRING and UNDEFINED initializers", onnx_of("s.onnx", *onnx_odd)),
        (".pt: quantized qint8 tensor", torch_saved("q.pt", {"w": torch.ones(2), "q": quantized})),
        (".pt: sparse COO tensor", torch_saved("sp.pt", {"w": torch.eye(3).to_sparse()})),
        (".pt: meta-device tensor", torch_saved("meta.pt", {"w": torch.empty(3, device="meta")})),
        (".pt: nn.Parameter", torch_saved("p.pt", {"w": torch.nn.Parameter(torch.ones(3))})),
    ]
    return [Case("dtypes", what, logm(make)) for what, make in made]


def code_cases() -> list[Case]:
    made: list[tuple[str, Callable[[Path], Path]]] = [
        (".pt (zip): __reduce__ that creates a file", code_pickle("z.pt", "zip")),
        (".pt (legacy): __reduce__ that creates a file", code_pickle("l.pt", "legacy")),
        (".pt: plain pickle protocol 2 with __reduce__", code_pickle("p2.pt", "2")),
        (".pt: plain pickle protocol 4 with __reduce__", code_pickle("p4.pt", "4")),
        (".pt: hand-written pickle calling os.system", os_system_pickle("sys.pt")),
        (
            ".pt: torch.save(..., pickle_protocol=4) of plain tensors",
            torch_saved("t4.pt", {"w": torch.ones(2)}, pickle_protocol=4),
        ),
        (".pt: a bare tensor, not a dict", torch_saved("bare.pt", torch.ones(3))),
        (".pt: a list of tensors", torch_saved("list.pt", [torch.ones(3)])),
    ]
    return [Case("code", what, logm(make)) for what, make in made]


def huge_cases() -> list[Case]:
    expanded = {"w": torch.ones(1).expand(1 << 31)}
    f32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    made: list[tuple[str, Callable[[Path], Path]]] = [
        (".pt: a stride-0 view of 2**31 elements (4 bytes stored)", torch_saved("x.pt", expanded)),
        (".pt: a storage record cut short", pt_with_short_storage("short.pt")),
        (".pt: a state dict nested 5,000 dicts deep", deeply_nested("deep.pt", 5000)),
        (".npz: header declares 2**40 float64, holds 16 bytes", npz_declaring("h.npz", (1 << 40,))),
        (".npz: 1 GiB of zeros deflated to 1 MB", npz_bomb("bomb.npz")),
        (".npz: two members with one name", npz_duplicate_members("dup.npz")),
        (".safetensors: header length 2**63", safetensors_header_length("h.safetensors", 1 << 63)),
        (
            ".safetensors: shape 2**40 over 16 bytes",
            safetensors_header("s.safetensors", {"w": {**f32, "shape": [1 << 40]}}, bytes(16)),
        ),
        (
            ".safetensors: offsets past the end",
            safetensors_header("o.safetensors", {"w": f32}, bytes(4)),
        ),
        (
            ".safetensors: metadata that is not str -> str",
            safetensors_header("md.safetensors", {"__metadata__": {"k": 1}, "w": f32}, bytes(16)),
        ),
        (".onnx: dims 2**40 with 16 bytes", onnx_of("d.onnx", onnx_tensor((1 << 40,), bytes(16)))),
        (
            ".onnx: dims whose product overflows int64",
            onnx_of("o.onnx", onnx_tensor((1 << 62, 1 << 62), bytes(16))),
        ),
        (".onnx: negative dims", onnx_of("n.onnx", onnx_tensor((-1, 4), bytes(16)))),
        (
            ".onnx: external data shorter than its tensor",
            onnx_external_to(raw("w.bin", bytes(8)), "w.bin"),
        ),
    ]
    return [Case("huge", what, logm(make)) for what, make in made]


def path_cases() -> list[Case]:
    def real(folder: Path) -> str:
        return str(saved("real.safetensors")(folder))

    def upper(folder: Path) -> Path:
        return saved("m.pt")(folder).rename(folder / "M.PT")

    made: list[tuple[str, Callable[[Path], Path]]] = [
        (".onnx: external data at /etc/passwd", onnx_of("m.onnx", onnx_external("/etc/passwd"))),
        (".onnx: external data at ../out.bin", onnx_of("m.onnx", onnx_external("../out.bin"))),
        (
            ".onnx: external data a symlink to /dev/zero",
            onnx_external_to(symlink("zero.bin", lambda _: "/dev/zero"), "zero.bin"),
        ),
        (".onnx: external data a folder", onnx_external_to(folder_named("data"), "data")),
        (".onnx: external data a FIFO", onnx_external_to(fifo("data.bin"), "data.bin")),
        (".safetensors: a symlink to a good snapshot", symlink("link.safetensors", real)),
        (".pt: a dangling symlink", symlink("gone.pt", lambda f: str(f / "absent.pt"))),
        (".pt: a symlink loop", symlink("loop.pt", lambda _: "loop.pt")),
        (".pt: a symlink to /dev/zero", symlink("zero.pt", lambda _: "/dev/zero")),
        (".npz: a FIFO", fifo("pipe.npz")),
        (".safetensors: a folder", folder_named("dir.safetensors")),
        ("unknown suffix .h5", raw("w.h5", b"\x89HDF\r\n")),
        ("no suffix", raw("weights", b"")),
        ("upper-case .PT", upper),
    ]
    return [Case("paths", what, logm(make)) for what, make in made]


def name_cases() -> list[Case]:
    injected = {"w\nFAKE: injected line": torch.ones(2), "\x1b[31mred\x1b[0m": torch.ones(2)}
    one = torch.ones(2)
    made: list[tuple[str, Callable[[Path], Path]]] = [
        (".safetensors: names with a newline and an ANSI escape", saved("n.safetensors", injected)),
        (".pt: non-str keys (int, tuple)", torch_saved("k.pt", {0: one, (1, 2): one})),
        (".pt: 'a.b' and {'a': {'b'}} both", torch_saved("c.pt", {"a.b": one, "a": {"b": one}})),
        (
            ".onnx: two initializers with one name",
            onnx_of("d.onnx", onnx_tensor((1,), bytes(4)), onnx_tensor((1,), bytes(4))),
        ),
    ]
    return [Case("names", what, logm(make)) for what, make in made]


def command_cases() -> list[Case]:
    good = saved("good.safetensors")
    nan = saved("nan.pt", {**WEIGHTS, "w": torch.full((2, 3), NAN)})
    zero = saved("zero.pt", {"w": torch.zeros(2, 3), "b": torch.zeros(2)})
    meta = torch_saved(
        "meta.pt", {name: torch.empty_like(t, device="meta") for name, t in WEIGHTS.items()}
    )
    region = ("--baseline", "paper:resnet50")

    def not_json(folder: Path) -> list[str]:
        other = saved("other.safetensors")(folder)
        region_file = raw("r.json", b"{not json")(folder)
        return ["check", str(good(folder)), str(other), "--baseline", str(region_file)]

    zeros = {f"layer{i}.bias": torch.zeros(64) for i in range(2000)}
    renamed = {f"val_{i}": tensor for i, tensor in enumerate(zeros.values())}
    renamed_zeros = two(saved("zeros.pt", zeros), saved("renamed.safetensors", renamed), "diff")
    return [
        Case("commands", "diff: 2,000 renamed all-zero tensors (.pt, .safetensors)", renamed_zeros),
        Case("commands", "logm: an .npz of 2,000 tensors", logm(saved("many.npz", zeros))),
        Case(
            "commands",
            "diff: a good file and a cut one",
            two(good, truncated("cut.pt", lambda n: n // 2), "diff"),
        ),
        Case("commands", "diff: NaN weights", two(good, nan, "diff")),
        Case("commands", "check: NaN weights (exit 1: diverged)", two(good, nan, "check", *region)),
        Case("commands", "check: all-zero weights", two(good, zero, "check", *region)),
        Case("commands", "check: a meta-device .pt", two(good, meta, "check", *region)),
        Case("commands", "diff: a meta-device .pt", two(good, meta, "diff")),
        Case("commands", "region: one snapshot without a step", lambda f: ["region", str(good(f))]),
        Case("commands", "check: a region file that is not JSON", not_json),
    ]


def cases() -> list[Case]:
    return [
        *format_cases(),
        *dtype_cases(),
        *code_cases(),
        *huge_cases(),
        *path_cases(),
        *name_cases(),
        *command_cases(),
    ]


# --- running ------------------------------------------------------------------------------------


def address_space() -> int:
    """This process's mapped bytes, which a forked child starts with."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run(case: Case, folder: Path) -> Outcome:
    argv = case.build(folder)
    out, err = folder / ".stdout", folder / ".stderr"
    limit = address_space() + EXTRA_ADDRESS_SPACE
    started = time.perf_counter()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(TIMEOUT_S)
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = (
                io.TextIOWrapper(os.fdopen(1, "wb", closefd=False)),
                io.TextIOWrapper(os.fdopen(2, "wb", closefd=False)),
            )
            warnings.resetwarnings()  # the interpreter's defaults, as a user's shell has them
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, wait_status = os.waitpid(child, 0)
    seconds = time.perf_counter() - started
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        status = (
            "timeout" if number == signal.SIGALRM else f"killed by {signal.Signals(number).name}"
        )
    else:
        status = str(os.WEXITSTATUS(wait_status))
    return Outcome(
        status,
        out.read_text(errors="replace"),
        err.read_text(errors="replace"),
        (folder / MARKER).exists(),
        seconds,
    )


def main_script() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as root:
        for index, case in enumerate(cases()):
            folder = Path(root) / f"case{index}"
            folder.mkdir()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # building files (deprecated options, zipfile)
                outcome = run(case, folder)
            rows.append((case, outcome))
            if not args.markdown:
                mark = "!!" if outcome.bad else "  "
                head = f"{mark} [{outcome.status:>2}] {outcome.verdict:<22}"
                print(f"{head} {case.description}: {outcome.summary}", flush=True)
    bad = [case for case, outcome in rows if outcome.bad]
    if args.markdown:
        print("| kind | input | exit | outcome | s | first line of output |")
        print("|---|---|---|---|---|---|")
        for case, outcome in rows:
            summary = outcome.summary.replace("|", "\\|").replace("`", "'")
            summary = re.sub(r"/tmp/hostile-[^/]+/case\d+/", "", summary)
            cells = [case.kind, case.description, outcome.status, outcome.verdict]
            cells += [f"{outcome.seconds:.1f}", f"`{summary}`"]
            print("| " + " | ".join(cells) + " |")
    print(
        f"\n{len(rows)} inputs, {len(bad)} mishandled"
        + (": " + "; ".join(c.description for c in bad) if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_script())

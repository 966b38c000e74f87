"""Demonstrations in memory (:class:`Episode`, :class:`DemoSet`) and on disk (robomimic/LIBERO HDF5).

File layout (robomimic; LIBERO files use the same tree)::

    data/                       attrs: mail_ros_format, rate_hz, cameras, joint_names,
                                       action_names, action_space (JSON lists as strings), total
    data/demo_<i>/              attrs: num_samples, instruction, source, episode, sync_stats (JSON),
                                       action_source (where the actions came from, e.g. "command")
        obs/<camera>_rgb        (N, H, W, 3) uint8, one frame per chunk, gzip-compressed
        obs/joint_states        (N, J) float32
        actions                 (N, action_dim) float32, robot units
        timestamps              (N,) float64, the aligned set stamp of each frame (seconds)

LIBERO files carry no ``mail_ros_format``: the instruction comes from ``data.attrs["problem_info"]``
(JSON, ``language_instruction``), camera names from the ``obs/*_rgb`` keys (``agentview``,
``eye_in_hand``), and rates/names take defaults (20 Hz, ``joint_<j>``, ``action_<k>``). Camera
names are mapped to the policy's names with ``camera_map`` (file name -> policy name). Files that
carry no ``action_space`` attribute (robomimic, LIBERO) read as :data:`UNDECLARED_ACTION_SPACE`.

Out of core: ``read_hdf5(..., lazy=True)`` loads only the small arrays (actions, joint states,
timestamps) and leaves every image dataset on disk as :class:`LazyFrames`, read a window at a time
(each process, DataLoader workers included, opens the file itself). Existing files are read as
they are, whatever their chunking and compression.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import zlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["DataError", "Episode", "DemoSet", "DemoWriter", "LazyFrames", "write_hdf5", "read_hdf5", "fingerprint_hdf5",
           "episode_instructions", "FORMAT_VERSION", "UNDECLARED_ACTION_SPACE", "IMAGE_COMPRESSION"]

FORMAT_VERSION = 1
LIBERO_RATE_HZ = 20.0  # LIBERO's OSC controller runs at 20 Hz
UNDECLARED_ACTION_SPACE = "unknown"
_DEMO_KEY = re.compile(r"^demo_(\d+)$")
# gzip (deflate) is in every HDF5 build, so robomimic/LIBERO tools read our files unchanged; level 1:
# decoding costs the same at any level, and higher levels shrink camera frames by a few % only.
IMAGE_COMPRESSION = {"compression": "gzip", "compression_opts": 1}


class LazyFrames:
    """The (N, H, W, 3) uint8 frames of one HDF5 dataset, read from disk when indexed.

    Holds only the file name and dataset key, so it pickles into DataLoader workers; each process
    opens the file once (see :func:`_reader`) and keeps no chunk cache, so memory does not grow
    with the number of episodes read. ``frames[a:b]`` returns a NumPy array; ``np.asarray(frames)``
    reads them all.

    Fast path: frames stored one per chunk, gzip-compressed or not (what :class:`DemoWriter`
    writes), are read chunk by chunk with ``read_direct_chunk`` and inflated with zlib, 3x faster
    than h5py's selection machinery for a few frames; any other layout (contiguous, other chunks or
    filters, as robomimic/LIBERO files may have) goes through h5py slicing, the reference the fast
    path is tested against.
    """

    def __init__(self, path: str | Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 codec: str | None = None, version: tuple[int, ...] | None = None) -> None:
        self.path, self.key = str(path), key
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.codec = codec  # "gzip" / "raw": one frame per chunk (fast path); None: h5py slicing
        # The file as it was read (see _file_version): frames are never read from a replaced file.
        self.version = _file_version(self.path) if version is None else tuple(version)

    @classmethod
    def of(cls, path: str | Path, ds: h5py.Dataset) -> "LazyFrames":
        """Lazy frames of the open dataset ``ds`` of the file ``path``."""
        codec = None
        if ds.chunks == (1, *ds.shape[1:]) and ds.dtype == np.uint8:
            plist = ds.id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]  # the filter pipeline
            codec = "raw" if not filters else "gzip" if filters == [h5py.h5z.FILTER_DEFLATE] else None
        return cls(path, ds.name, ds.shape, ds.dtype, codec, _file_version(path))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        ds = _dataset(os.getpid(), self.path, self.version, self.key)
        if self.codec is not None and isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self.shape[0])
            out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
            for k in range(start, stop):
                out[k - start] = self._chunk(ds, k)
            return out
        if self.codec is not None and isinstance(index, (int, np.integer)) and -self.shape[0] <= index < self.shape[0]:
            return self._chunk(ds, int(index) % self.shape[0])
        return ds[index]

    def _chunk(self, ds: h5py.Dataset, k: int) -> np.ndarray:
        """Frame ``k``, stored alone in its chunk."""
        mask, data = ds.id.read_direct_chunk((k,) + (0,) * (len(self.shape) - 1))
        if self.codec == "gzip" and not mask & 1:  # bit 0 set: HDF5 stored this chunk without the filter
            data = zlib.decompress(data)
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        frames = self[()]
        return frames if dtype is None else frames.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyFrames({self.path}:{self.key}, shape={self.shape})"


_readers: dict[tuple[int, str, tuple[int, ...]], h5py.File] = {}
_readers_lock = threading.Lock()


def _file_version(path: str | Path) -> tuple[int, ...]:
    """(device, inode, size, mtime ns): a file replaced in place (convert's atomic rename) differs."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=1024)
def _dataset(pid: int, path: str, version: tuple[int, ...], key: str) -> h5py.Dataset:
    """An open dataset of this process (``pid`` keys out a forked parent's): looking one up by
    name costs as much as reading two frames. Bounded (an open image dataset holds ~50 KiB of
    HDF5 metadata once read, so at most ~50 MB), so memory does not grow with the episodes; 1024
    covers the demo set's 720 episodes x 2 cameras only in part, which costs a look-up per miss."""
    return _reader(path, version)[key]


def _reader(path: str, version: tuple[int, ...]) -> h5py.File:
    """This process's read handle on ``path`` as it was when its episodes were read (``version``).

    Keyed by process id: a forked DataLoader worker must not use its parent's HDF5 handle. A file
    replaced since then is refused, not mixed with the episodes' actions read from the old one.
    ``rdcc_nbytes=0``: no per-dataset chunk cache; a window touches each frame once, and a cache
    per image dataset would grow with the number of episodes.
    """
    key = (os.getpid(), path, version)
    with _readers_lock:
        handle = _readers.get(key)
        if handle is None:
            try:
                handle = h5py.File(path, "r", rdcc_nbytes=0)
            except OSError as exc:
                raise DataError(f"{path}: cannot open as HDF5: {exc}") from exc
            if _file_version(path) != version:
                handle.close()
                raise DataError(f"{path} was replaced after its episodes were read; read it again")
            _readers[key] = handle
        return handle


class DataError(ValueError):
    """Demonstration data is missing, malformed or inconsistent; the message names file/topic/time."""


@dataclass
class Episode:
    """One demonstration: N aligned frames, the actions taken at them, and the instruction."""

    images: dict[str, np.ndarray | LazyFrames]  # camera -> (N, H, W, 3) uint8
    joint_positions: np.ndarray  # (N, J) float32
    actions: np.ndarray  # (N, action_dim) float32, robot units
    instruction: str
    timestamps: np.ndarray  # (N,) float64 seconds
    source: str = ""
    sync_stats: dict[str, Any] = field(default_factory=dict)
    action_source: str = ""  # how the actions were labelled (mail_ros.data.action_sources); "" unknown

    def __post_init__(self) -> None:
        self.joint_positions = np.asarray(self.joint_positions, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        n = len(self.actions)
        where = self.source or "episode"
        if not self.images:
            raise DataError(f"{where}: no camera images")
        for cam, img in self.images.items():
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
                raise DataError(f"{where}: camera {cam!r} images must be (N, H, W, 3) uint8, got {img.dtype} {img.shape}")
            if len(img) != n:
                raise DataError(f"{where}: camera {cam!r} has {len(img)} frames but there are {n} actions")
        if self.actions.ndim != 2 or self.joint_positions.ndim != 2:
            raise DataError(f"{where}: actions and joint_states must be 2-D, got {self.actions.shape} and {self.joint_positions.shape}")
        if len(self.joint_positions) != n or len(self.timestamps) != n:
            raise DataError(
                f"{where}: {n} actions but {len(self.joint_positions)} joint states and {len(self.timestamps)} timestamps"
            )
        for name, values in (("actions", self.actions), ("joint_states", self.joint_positions)):
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
            if len(bad):
                raise DataError(
                    f"{where}: non-finite {name} at frame {bad[0]} (t={self.timestamps[bad[0]]:.3f} s), {len(bad)} frames in all"
                )

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def image_size(self) -> tuple[int, int]:
        first = next(iter(self.images.values()))
        return int(first.shape[1]), int(first.shape[2])


@dataclass
class DemoSet:
    """Episodes sharing one camera list, joint and action naming, and rate."""

    episodes: list[Episode]
    cameras: tuple[str, ...]
    joint_names: tuple[str, ...]
    action_names: tuple[str, ...]
    rate_hz: float
    action_space: str = "joint_position"
    source: str = ""

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.joint_names = tuple(self.joint_names)
        self.action_names = tuple(self.action_names)
        for ep in self.episodes:
            where = ep.source or self.source
            if set(ep.images) != set(self.cameras):
                raise DataError(f"{where}: cameras {sorted(ep.images)} differ from the set's {list(self.cameras)}")
            if ep.joint_positions.shape[1] != len(self.joint_names):
                raise DataError(f"{where}: {ep.joint_positions.shape[1]} joint values, expected {len(self.joint_names)} ({list(self.joint_names)})")
            if ep.actions.shape[1] != len(self.action_names):
                raise DataError(f"{where}: {ep.actions.shape[1]} action values, expected {len(self.action_names)} ({list(self.action_names)})")
        sizes = {(ep.source, cam): img.shape[1:3] for ep in self.episodes for cam, img in ep.images.items()}
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes.items()))
            odd = next(item for item in sizes.items() if item[1] != first[1])
            raise DataError(
                f"mismatched image sizes: {odd[0][0]} camera {odd[0][1]!r} is {tuple(odd[1])}, "
                f"but {first[0][0]} camera {first[0][1]!r} is {tuple(first[1])}; convert with one --image-size"
            )

    @property
    def num_frames(self) -> int:
        return sum(len(ep) for ep in self.episodes)


class DemoWriter:
    """Writes episodes one at a time into a temp file next to ``path``; renamed into place on close.

    Use as a context manager: on an exception (or Ctrl-C) the temp file is deleted and an
    existing file at ``path`` is left untouched, so there is never a half-written demo file.
    """

    def __init__(self, path: str | Path, cameras: Sequence[str], joint_names: Sequence[str],
                 action_names: Sequence[str], rate_hz: float, action_space: str = "joint_position") -> None:
        self.path = Path(path)
        self.cameras = tuple(cameras)
        self.joint_names = tuple(joint_names)
        self.action_names = tuple(action_names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.file = h5py.File(self.tmp, "w")
        self.data = self.file.create_group("data")
        self.data.attrs["mail_ros_format"] = FORMAT_VERSION
        self.data.attrs["rate_hz"] = float(rate_hz)
        self.data.attrs["cameras"] = json.dumps(list(self.cameras))
        self.data.attrs["joint_names"] = json.dumps(list(self.joint_names))
        self.data.attrs["action_names"] = json.dumps(list(self.action_names))
        # Written on close: a merge learns it from its inputs while writing them.
        self.action_space = action_space
        self.episodes = 0
        self.frames = 0
        self.image_size: tuple[int, int] | None = None

    def add(self, ep: Episode) -> None:
        """Append one episode as ``data/demo_<i>``; checks it against the file's names and image size."""
        DemoSet([ep], self.cameras, self.joint_names, self.action_names, 1.0)
        if self.image_size is None:
            self.image_size = ep.image_size
        elif ep.image_size != self.image_size:
            raise DataError(f"{ep.source}: images are {ep.image_size}, earlier episodes in {self.path} are {self.image_size}")
        g = self.data.create_group(f"demo_{self.episodes}")
        g.attrs["num_samples"] = len(ep)
        g.attrs["instruction"] = ep.instruction
        g.attrs["source"] = ep.source
        g.attrs["sync_stats"] = json.dumps(ep.sync_stats)
        g.attrs["action_source"] = ep.action_source
        obs = g.create_group("obs")
        for cam in self.cameras:
            img = np.asarray(ep.images[cam])
            # One image per chunk: a training window reads T frames at random places.
            obs.create_dataset(f"{cam}_rgb", data=img, chunks=(1, *img.shape[1:]), **IMAGE_COMPRESSION)
        obs.create_dataset("joint_states", data=ep.joint_positions)
        g.create_dataset("actions", data=ep.actions)
        g.create_dataset("timestamps", data=ep.timestamps)
        self.episodes += 1
        self.frames += len(ep)

    def close(self) -> None:
        """Finish the file and move it to ``path``."""
        self.data.attrs["total"] = self.frames
        self.data.attrs["action_space"] = self.action_space
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temp file; ``path`` keeps whatever it held before."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_hdf5(path: str | Path, demos: DemoSet) -> None:
    """Write ``demos`` to ``path`` atomically (a temp file in the same folder, renamed at the end)."""
    with DemoWriter(path, demos.cameras, demos.joint_names, demos.action_names, demos.rate_hz, demos.action_space) as writer:
        for ep in demos.episodes:
            writer.add(ep)


def _json_attr(attrs: h5py.AttributeManager, key: str, default: Any) -> Any:
    if key not in attrs:
        return default
    value = attrs[key]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


def _str_attr(attrs: h5py.AttributeManager, key: str, default: str = "") -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _demo_keys(data: h5py.Group) -> list[str]:
    """The ``demo_<i>`` groups of ``data`` in numeric order (demo_10 after demo_9)."""
    return sorted((k for k in data if _DEMO_KEY.match(k)), key=lambda k: int(_DEMO_KEY.match(k)[1]))


def _default_instruction(data: h5py.Group) -> str:
    """The instruction of episodes without their own: LIBERO's ``problem_info``, else ""."""
    problem = _json_attr(data.attrs, "problem_info", {})
    return problem.get("language_instruction", "") if isinstance(problem, dict) else ""


def episode_instructions(path: str | Path) -> list[tuple[str, str]]:
    """(group key, instruction) of every episode of a demo file, in :func:`read_hdf5`'s order;
    reads attributes only."""
    path = Path(path)
    with _open(path) as f:
        if "data" not in f:
            raise DataError(f"{path}: no 'data' group; not a robomimic/LIBERO demo file")
        data = f["data"]
        default = _default_instruction(data)
        return [(key, _str_attr(data[key].attrs, "instruction", default)) for key in _demo_keys(data)]


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"{path}: cannot open as HDF5: {exc}") from exc


def fingerprint_hdf5(path: str | Path) -> str:
    """A SHA-256 of a demo file's content that stays cheap for multi-GB files.

    Per episode, in order: its group name, instruction, actions, joint states and timestamps
    (dtype, shape and bytes). Images are left out: they are nearly all of the bytes, and two
    different recordings never agree on all of the rest. Rewriting a file with other chunking or
    compression keeps the fingerprint.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with _open(path) as f:
        if "data" not in f:
            raise DataError(f"{path}: no 'data' group; not a robomimic/LIBERO demo file")
        for key in _demo_keys(f["data"]):
            group = f["data"][key]
            digest.update(f"{key}\0{_str_attr(group.attrs, 'instruction')}\0".encode())
            for name in ("actions", "obs/joint_states", "timestamps"):
                if name in group:
                    values = np.ascontiguousarray(group[name][()])
                    digest.update(f"{name} {values.dtype.str} {values.shape}\0".encode())
                    digest.update(values.tobytes())
    return digest.hexdigest()


def read_hdf5(path: str | Path, camera_map: Mapping[str, str] | None = None,
              cameras: Sequence[str] | None = None, lazy: bool = False) -> DemoSet:
    """Load a mail_ros, robomimic or LIBERO demo file.

    ``camera_map`` renames file cameras (``obs/<name>_rgb``) to policy camera names; ``cameras``
    (policy names) selects which to load, all by default. ``lazy``: images stay on disk as
    :class:`LazyFrames` (everything else is loaded). Raises :class:`DataError` naming the file
    and key on anything missing or malformed.
    """
    path = Path(path)
    camera_map = dict(camera_map or {})
    with _open(path) as f:
        if "data" not in f:
            raise DataError(f"{path}: no 'data' group; not a robomimic/LIBERO demo file")
        data = f["data"]
        demo_keys = _demo_keys(data)
        if not demo_keys:
            raise DataError(f"{path}: 'data' holds no demo_<i> groups")
        first_obs = data[demo_keys[0]].get("obs")
        if first_obs is None:
            raise DataError(f"{path}: data/{demo_keys[0]} has no 'obs' group")
        file_cameras = _json_attr(data.attrs, "cameras", None) or sorted(
            k[: -len("_rgb")] for k in first_obs if k.endswith("_rgb")
        )
        unknown_map = sorted(set(camera_map) - set(file_cameras))
        if unknown_map:
            raise DataError(f"{path}: camera_map names {unknown_map} not in the file's cameras {file_cameras}")
        renamed = {camera_map.get(c, c): c for c in file_cameras}
        wanted = list(cameras) if cameras is not None else list(renamed)
        missing = [c for c in wanted if c not in renamed]
        if missing:
            raise DataError(
                f"{path}: cameras {missing} not found; the file has {file_cameras} "
                f"(as policy names: {list(renamed)}); map names with camera_map / --camera-map FILE=POLICY"
            )
        default_instruction = _default_instruction(data)
        rate = float(data.attrs.get("rate_hz", LIBERO_RATE_HZ))
        episodes = []
        for key in demo_keys:
            g = data[key]
            where = f"{path}:data/{key}"
            for needed in ["actions", "obs/joint_states"] + [f"obs/{renamed[c]}_rgb" for c in wanted]:
                if needed not in g:
                    raise DataError(f"{where}: missing dataset {needed!r}")
            actions = g["actions"][()]
            stamps = g["timestamps"][()] if "timestamps" in g else np.arange(len(actions)) / rate
            if lazy:
                images = {}
                for c in wanted:
                    images[c] = LazyFrames.of(path, g[f"obs/{renamed[c]}_rgb"])
            else:
                images = {c: g[f"obs/{renamed[c]}_rgb"][()] for c in wanted}
            episodes.append(
                Episode(
                    images=images,
                    joint_positions=g["obs/joint_states"][()],
                    actions=actions,
                    instruction=_str_attr(g.attrs, "instruction", default_instruction),
                    timestamps=stamps,
                    source=_str_attr(g.attrs, "source", where) or where,
                    sync_stats=_json_attr(g.attrs, "sync_stats", {}),
                    action_source=_str_attr(g.attrs, "action_source"),
                )
            )
        j = episodes[0].joint_positions.shape[1]
        a = episodes[0].actions.shape[1]
        return DemoSet(
            episodes=episodes,
            cameras=tuple(wanted),
            joint_names=tuple(_json_attr(data.attrs, "joint_names", None) or [f"joint_{i}" for i in range(j)]),
            action_names=tuple(_json_attr(data.attrs, "action_names", None) or [f"action_{i}" for i in range(a)]),
            rate_hz=rate,
            # robomimic/LIBERO files do not say; LIBERO's are OSC end-effector deltas.
            action_space=_str_attr(data.attrs, "action_space", UNDECLARED_ACTION_SPACE),
            source=str(path),
        )

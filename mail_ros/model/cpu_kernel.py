"""The fused CPU kernels of the Mamba layer (selective_scan_cpu.c): built on first use, called via ctypes.

The selective-scan kernel computes, in one pass with the state held in registers, what
:func:`mail_ros.model.selective_scan.selective_scan` computes (the reference, and the training
path) plus the softplus of the step size and the silu(z) gate of the Mamba layer; the
convolution kernel computes silu of the causal depthwise convolution (reference:
``Mamba._causal_conv``) and the next conv state. The stack kernel runs a whole
:class:`mail_ros.model.mamba_stack.MambaStack` (LayerNorms, in_proj, conv, x_proj, scan, gate,
out_proj, residual adds, final LayerNorm) in one call, with the projection weights packed once
per weight version (:meth:`CpuKernel.pack_mamba_stack`). They are used for float32 CPU
inference only; see :class:`mail_ros.model.mamba.Mamba` and the stack.

Build: plain C with the C compiler the set-up already requires (``cc -O3 -march=native -fopenmp``,
about a second), on the first use in a process, into a cache folder shared by later processes:
``$MAIL_ROS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mail_ros/kernels``, else
``~/.cache/mail_ros/kernels``. The library's name hashes the source, the compiler and its
version, the flags and the CPU's feature flags, so an edited source, another compiler or another
CPU (a home folder shared between machines) builds anew. This works the same for a venv and a
colcon install on a ROS machine (the .c file is installed beside this module); nothing is built
at install time; ``python -m mail_ros.model.cpu_kernel`` builds it ahead (say, on a robot computer
before its first run) and prints where, or why not.

Switches (environment variables, read once per process):

* ``MAIL_ROS_CPU_KERNEL=0`` turns the kernel off: the PyTorch reference scan runs.
* ``CC`` names the compiler (default ``cc``).

Any failure (no compiler, a compile error, a library that does not load) is logged once with
its reason and the PyTorch reference scan runs instead; nothing raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CpuKernel", "ENV_SWITCH", "LAYER_FIELDS", "PackedMambaStack", "cpu_kernel_unavailable_reason",
           "load_cpu_kernel", "stack_weights_key"]

log = logging.getLogger(__name__)

ENV_SWITCH = "MAIL_ROS_CPU_KERNEL"
SOURCE = Path(__file__).with_name("selective_scan_cpu.c")
# -fno-trapping-math lets the compiler turn the selects in softplus into vector blends (with
# it the softplus loop is vectorised and the kernel runs 3x faster; torch is built with it too).
# -ffp-contract=fast fuses multiply-adds into FMA instructions, which -std=c11 (ISO mode) turns
# off in GCC: 1.5-1.7x on the projections and the scan (d_model 128, L = 201).
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast", "-std=c11",
         "-fPIC", "-shared", "-fopenmp")
BUILD_TIMEOUT_S = 120.0

# The tensors of one Mamba block that CpuKernel.mamba_stack takes, in order (the C enum F_*).
LAYER_FIELDS = ("norm.weight", "norm.bias", "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias",
                "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight",
                "out_proj.bias", "norm.eps")
PACKED_FIELDS = ("in_proj.weight", "x_proj.weight", "out_proj.weight")  # copied into panels

# The entry points take their arguments (see the C source; at most 31) as one int64 array.
_Args = ctypes.c_int64 * 31


def cache_dir() -> Path:
    """Folder the kernel library is built into (see the module docstring)."""
    if os.environ.get("MAIL_ROS_KERNEL_CACHE"):
        return Path(os.environ["MAIL_ROS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mail_ros" / "kernels"


def _cpu_features() -> str:
    """The CPU's feature flags (-march=native depends on them), best effort."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: list[str]) -> Path:
    """Compile the kernel into the cache (atomically: other processes may build the same one)."""
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                                 timeout=BUILD_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"C compiler {shlex.join(compiler)!r} not usable ({err})") from err
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), shlex.join(compiler), version, *FLAGS, _cpu_features(), platform.machine()]
    ).encode()).hexdigest()[:16]
    target = cache_dir() / f"selective_scan_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        out = subprocess.run([*compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed (exit {out.returncode}): "
                               f"{out.stderr.strip()[-1500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the CPU selective-scan kernel: %s", target)
    return target


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, L, X) float32 with the last dimension contiguous (rows may be strided): the views
    the Mamba layer passes (chunk of in_proj, split of x_proj) already are, so nothing is copied."""
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _check_state(name: str, state: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not (state.dtype == torch.float32 and state.is_contiguous() and tuple(state.shape) == shape):
        raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}, "
                         f"got {state.dtype} {tuple(state.shape)}")


StackFields = Sequence[Sequence[torch.Tensor | float | None]]
NormFields = Sequence[torch.Tensor | float | None]


@dataclass(frozen=True, eq=False)
class PackedMambaStack:
    """A Mamba stack's weights as the fused kernel takes them (:meth:`CpuKernel.pack_mamba_stack`)."""

    key: list  # stack_weights_key of the sources when packed
    n_layers: int
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    final: tuple[int, int, int]  # final LayerNorm: weight and bias pointers, eps as double bits
    table: ctypes.Array  # n_layers x LAYER_FIELDS pointers into `tensors` (eps as double bits)
    tensors: tuple[torch.Tensor, ...]  # keeps what the table points to alive


@dataclass(frozen=True)
class CpuKernel:
    """The loaded kernel library. Arguments are float32 CPU tensors (others are converted)."""

    path: Path
    _scan: ctypes._CFuncPtr
    _conv: ctypes._CFuncPtr
    _stack: ctypes._CFuncPtr
    _pack: ctypes._CFuncPtr
    panel: int  # output features per packed weight panel

    def selective_scan(
        self,
        u: torch.Tensor,
        dt: torch.Tensor,
        dt_bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        state: torch.Tensor,
        dt_softplus: bool = True,
        dt_weight: torch.Tensor | None = None,
        a_is_log: bool = False,
    ) -> torch.Tensor:
        """Fused scan; ``state`` is read and overwritten IN PLACE.

        Args:
            u, dt: (B, L, E) scan input and step size before ``dt_bias`` and softplus (with
                ``dt_softplus=False``: delta itself). With ``dt_weight`` (E, R), dt is (B, L, R)
                and the step size is ``dt @ dt_weight.T`` (the layer's dt_proj without bias).
            dt_bias: (E,) or None; A: (E, N) negative, or log(-A) with ``a_is_log`` (the
                layer's A_log); B, C: (B, L, N); D: (E,) or None.
            z: (B, L, E) gate (y is multiplied by silu(z)) or None.
            state: (B, E, N) contiguous float32: the state before the first step, replaced by
                the state after the last.

        Returns:
            y (B, L, E) float32, contiguous.
        """
        batch, length, channels = u.shape
        d_state = A.shape[1]
        _check_state("state", state, (batch, channels, d_state))
        u, dt, B, C = _rows(u), _rows(dt), _rows(B), _rows(C)
        z = None if z is None else _rows(z)
        A, D, dt_bias, dt_weight = _flat(A), _flat(D), _flat(dt_bias), _flat(dt_weight)
        if dt.shape[-1] != (channels if dt_weight is None else dt_weight.shape[1]):
            raise ValueError(f"dt of shape {tuple(dt.shape)} does not match u {tuple(u.shape)} "
                             f"and dt_weight {None if dt_weight is None else tuple(dt_weight.shape)}")
        y = torch.empty(batch, length, channels, dtype=torch.float32)
        self._scan(_Args(
            batch, length, channels, d_state,
            _ptr(u), *_strides(u), _ptr(dt), *_strides(dt), _ptr(dt_bias), int(dt_softplus), _ptr(A),
            _ptr(B), *_strides(B), _ptr(C), *_strides(C), _ptr(D), _ptr(z), *_strides(z),
            _ptr(state), _ptr(y), *_strides(y), torch.get_num_threads(),
            _ptr(dt_weight), 0 if dt_weight is None else dt_weight.shape[1], int(a_is_log),
        ))
        return y

    def causal_conv_silu(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        new_state: torch.Tensor | None,
    ) -> torch.Tensor:
        """silu(depthwise causal conv) of x (B, L, E) continuing from ``conv_state``.

        Args:
            x: (B, L, E) conv inputs.
            conv_state: (B, E, K) contiguous float32, the last K inputs before x (oldest
                first; only the last K - 1 enter), or None for zeros.
            weight: (E, K); bias: (E,) or None.
            new_state: (B, E, K) contiguous float32 that receives the last K inputs after x
                (may be ``conv_state`` itself), or None.

        Returns:
            (B, L, E) float32, contiguous.
        """
        batch, length, channels = x.shape
        if length < 1:
            raise ValueError(f"causal_conv_silu needs at least one step, got x of shape {tuple(x.shape)}")
        width = weight.shape[-1]
        for name, state in (("conv_state", conv_state), ("new_state", new_state)):
            if state is not None:
                _check_state(name, state, (batch, channels, width))
        x = _rows(x)
        weight, bias = _flat(weight), _flat(bias)
        out = torch.empty(batch, length, channels, dtype=torch.float32)
        self._conv(_Args(
            batch, length, channels, width, _ptr(x), *_strides(x), _ptr(conv_state), _ptr(weight),
            _ptr(bias), _ptr(out), _ptr(new_state), torch.get_num_threads(),
        ))
        return out

    def pack_mamba_stack(self, layers: StackFields, final_norm: NormFields) -> PackedMambaStack:
        """The weights of a Mamba stack as :meth:`mamba_stack` takes them.

        Args:
            layers: per block, its tensors in the order of :data:`LAYER_FIELDS` (LayerNorm
                weight and bias, in_proj weight (2E, D) and bias, conv weight (E, 1, K) or
                (E, K) and bias, x_proj weight (R + 2N, E), dt_proj weight (E, R) and bias,
                A_log (E, N), D (E,), out_proj weight (D, E) and bias; absent biases None),
                then the LayerNorm's eps.
            final_norm: (weight, bias, eps) of the final LayerNorm.

        The three projection weights are copied into the kernel's panel layout; the result
        holds references to everything it points to and is valid while
        :func:`stack_weights_key` of the same arguments stays equal to its ``key``.
        """
        keep: list[torch.Tensor] = []
        table: list[int] = []
        for fields in layers:
            if len(fields) != len(LAYER_FIELDS):
                raise ValueError(f"a layer has {len(fields)} fields, expected {LAYER_FIELDS}")
            for name, field in zip(LAYER_FIELDS, fields):
                if isinstance(field, float):
                    table.append(_double_bits(field))
                    continue
                field = _flat(field)
                if name in PACKED_FIELDS:
                    n_out, n_in = field.shape
                    packed = torch.empty(-(-n_out // self.panel), n_in, self.panel, dtype=torch.float32)
                    self._pack(_Args(n_out, n_in, _ptr(field), _ptr(packed)))
                    field = packed
                keep.append(field)
                table.append(_ptr(field))
        final_w, final_b = _flat(final_norm[0]), _flat(final_norm[1])
        keep += [final_w, final_b]
        first = layers[0]
        d_inner, d_state = first[LAYER_FIELDS.index("A_log")].shape
        return PackedMambaStack(
            key=stack_weights_key(layers, final_norm),
            n_layers=len(layers),
            d_model=first[0].shape[0],
            d_inner=d_inner,
            d_state=d_state,
            d_conv=first[LAYER_FIELDS.index("conv1d.weight")].shape[-1],
            dt_rank=first[LAYER_FIELDS.index("dt_proj.weight")].shape[-1],
            final=(_ptr(final_w), _ptr(final_b), _double_bits(final_norm[2])),
            table=(ctypes.c_int64 * len(table))(*table),
            tensors=tuple(keep),
        )

    def mamba_stack(
        self,
        x: torch.Tensor,
        weights: PackedMambaStack,
        states: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        new_states: tuple[torch.Tensor, torch.Tensor] | None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A stack of pre-norm Mamba blocks and its final LayerNorm in one call (MambaStack.extend).

        Args:
            x: (B, L, D) input.
            weights: from :meth:`pack_mamba_stack`.
            states: per block (conv_state (B, E, K), ssm_state (B, E, N)) to continue from
                (never modified), or None for zeros.
            new_states: (conv (n_layers, B, E, K), ssm (n_layers, B, E, N)) contiguous float32
                buffers that receive every block's final states, or None.
            memory: (B, L, D) added to the residual stream after every block (ED-Ma), or None.

        Returns:
            (B, L, D) float32, contiguous.
        """
        batch, length, d_model = x.shape
        w = weights
        if d_model != w.d_model or length < 1:
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit a stack of width {w.d_model}")
        x, memory = _flat(x), _flat(memory)
        if memory is not None and memory.shape != x.shape:
            raise ValueError(f"memory of shape {tuple(memory.shape)} does not match x {tuple(x.shape)}")
        keep = [x, memory]  # converted tensors must outlive the call
        state_table = None
        if states is not None or new_states is not None:
            if states is not None and len(states) != w.n_layers:
                raise ValueError(f"states for {len(states)} layers given, the stack has {w.n_layers}")
            shapes = ((batch, w.d_inner, w.d_conv), (batch, w.d_inner, w.d_state))
            if new_states is not None:
                for name, buffer, shape in zip(("conv", "ssm"), new_states, shapes):
                    _check_state(f"new {name} states", buffer, (w.n_layers, *shape))
            pointers = []
            for index in range(w.n_layers):
                for name, state, shape in zip(("conv_state", "ssm_state"),
                                              (None, None) if states is None else states[index], shapes):
                    if state is not None and tuple(state.shape) != shape:
                        raise ValueError(f"{name} of layer {index} must have shape {shape}, "
                                         f"got {tuple(state.shape)}")
                    state = _flat(state)
                    keep.append(state)
                    pointers.append(_ptr(state))
                pointers += [0, 0] if new_states is None else [_ptr(new_states[0][index]),
                                                               _ptr(new_states[1][index])]
            state_table = (ctypes.c_int64 * len(pointers))(*pointers)
        out = torch.empty(batch, length, d_model, dtype=torch.float32)
        args = _Args(
            batch, length, w.n_layers, d_model, w.d_inner, w.d_state, w.d_conv, w.dt_rank, _ptr(x), _ptr(out),
            _ptr(memory), *w.final, ctypes.addressof(w.table),
            0 if state_table is None else ctypes.addressof(state_table), torch.get_num_threads(), 0,
        )
        self._stack(args)
        if args[17] != 0:
            raise MemoryError("the fused Mamba stack could not allocate its scratch memory")
        return out


def stack_weights_key(layers: StackFields, final_norm: NormFields) -> list:
    """What a :class:`PackedMambaStack` depends on: every tensor's storage (a replaced parameter
    has another) and version counter (bumped by in-place updates: load_state_dict, optimiser and
    EMA steps; the packed weights, and any tensor that had to be converted, are copies), and the
    eps values. Written for speed: it runs on every call (about 30 us for 16 layers)."""
    tensors = [t for fields in layers for t in fields[:-1] if t is not None]
    tensors += [t for t in final_norm[:-1] if t is not None]
    key = [t.data_ptr() for t in tensors]
    key += [t._version for t in tensors]
    key += [fields[-1] for fields in layers]
    key.append(final_norm[-1])
    return key


def _double_bits(value: float) -> int:
    """A float as the int64 holding its double's bits (how the C entry points take it)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def load_cpu_kernel() -> CpuKernel | None:
    """The kernel, built if needed; None (reason logged once per process) when unavailable."""
    return _load()[0]


def cpu_kernel_unavailable_reason() -> str | None:
    """Why :func:`load_cpu_kernel` returns None (for start-up reports), or None when it loaded."""
    return _load()[1]


@functools.cache
def _load() -> tuple[CpuKernel | None, str | None]:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        reason = f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        log.warning("CPU selective-scan kernel %s: the PyTorch reference scan runs", reason)
        return None, reason
    compiler = shlex.split(os.environ.get("CC") or "cc")
    try:
        if not compiler or shutil.which(compiler[0]) is None:
            raise RuntimeError(f"C compiler {os.environ.get('CC') or 'cc'!r} not found (set CC, or "
                               f"install one: Debian/Ubuntu 'apt-get install build-essential')")
        path = _build(compiler)
        # torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime
        # torch already loaded: one thread pool for both.
        library = ctypes.CDLL(str(path))
        functions = (library.mail_selective_scan_f32, library.mail_causal_conv_silu_f32,
                     library.mail_mamba_stack_f32, library.mail_pack_panels_f32)
        library.mail_linear_panel.restype = ctypes.c_int64
        panel = library.mail_linear_panel()
    except Exception as err:  # noqa: BLE001 - any failure means: run the reference, and say why
        log.warning("CPU selective-scan kernel unavailable (%s): the PyTorch reference scan runs "
                    "(%s=0 silences this)", err, ENV_SWITCH)
        return None, str(err)
    for function in functions:
        function.argtypes = [ctypes.POINTER(ctypes.c_int64)]
        function.restype = None
    return CpuKernel(path, *functions, panel), None


def main() -> int:
    """``python -m mail_ros.model.cpu_kernel``: build (or find) the kernel now and say where."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernel = load_cpu_kernel()
    if kernel is None:
        print(f"CPU kernel unavailable: {cpu_kernel_unavailable_reason()}")
        return 1
    print(f"CPU kernel: {kernel.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Integer matmuls: INT8 x INT8 -> INT32, exact, with a per-shape choice of backend.

``int_mm(a, b)`` computes ``a @ b.T`` for int8 ``a`` ``(M, K)`` and int8 ``b`` ``(N, K)``, returning int32
``(M, N)``. Every backend gives the same integers (the result is exact), so the choice only changes speed:

- ``torch``: ``torch._int_mm`` (oneDNN on CPU, cuBLASLt on CUDA). It reads ``b.T``, which for a row-major
  ``(N, K)`` weight is a column-major ``(K, N)`` view: oneDNN takes it as a transposed operand without a
  copy (timed against a contiguous ``(K, N)`` copy on the zoo shapes: within the noise, so the one stored
  layout serves every backend; ``scripts/bench_w8a8.py --gemm`` re-measures it). On CPU it is wrong for
  ``K == 1`` (torch 2.13; tested), so that case gets a zero column. On CUDA ``_int_mm`` needs ``M > 16``
  and ``K``, ``N`` multiples of 8: smaller or ragged inputs are zero-padded (untested here: no GPU).
- ``lowbit``: the hand-written C++/OpenMP kernel (AVX2 ``maddubs``/``madd`` with the sign trick, see
  ``csrc/int8_gemm.cpp``), compiled once into the lowbit cache. CPU only; needs ``a`` in [-127, 127]
  (its no-saturation condition, which the symmetric activation codes of :mod:`lowbit.nn.w8a8` meet) and
  reads ``(N, Kp)`` rows with ``Kp`` a multiple of 32 (a ragged ``K`` is zero-padded per call).
- ``reference``: the plain-torch reference, a float matmul of the codes, in float32 when
  ``K * max|a| * max|b| < 2**24`` (every partial sum is then an exactly representable integer) and float64
  otherwise (exact to 2**53).

Which is faster depends on the CPU and the shape. One run on the project machine (a Xeon with avx512_vnni
and amx_int8, torch 2.13, one thread, minimum of 5, other jobs running), the nine zoo shapes: at 1024
tokens ``torch._int_mm`` took 0.17-3.1 ms, the hand kernel 2.0-34 ms and an fp32 ``F.linear`` 1.5-22 ms
(``_int_mm`` 3-13x faster than fp32, the hand kernel 1.3-2.6x slower); at one token the hand kernel won
(0.005-0.035 ms, ``_int_mm`` 0.015-0.11 ms, fp32 0.008-0.24 ms). On a CPU without VNNI/AMX oneDNN's int8
path can be much slower (the project's earlier AVX2-only AMD machine took 50x its fp32 time for a
2048x576x1536 ``_int_mm``), so nothing is assumed: in ``auto`` mode the first call of each (M bucket, K, N,
device) times both available backends on random codes of that shape (M rounded up to a power of two, at
most 1024; tens of ms for the largest zoo shape) and :data:`dispatcher` keeps the faster for the process.

``LOWBIT_INTMM`` forces a path: ``torch``, ``lowbit`` or ``reference``; ``auto`` (or unset, or ``1``)
measures; ``0`` keeps its old meaning, the C++ extension is neither built nor used (``auto`` then chooses
among the rest). A forced or preferred backend that is missing (no compiler, a torch without ``_int_mm``
or one that fails on this device) is logged once and the next one takes over.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .build import build_once

__all__ = ["BACKENDS", "IntMMDispatcher", "N_BLOCK", "act_quant", "act_quant_reference", "available_backends",
           "dispatcher", "epilogue_kernels", "int_linear", "int_mm", "int_mm_backend", "int_mm_on", "int_mm_reference",
           "intmm_mode", "load_intmm", "onednn_linear_mm", "onednn_prepack", "onednn_works", "pad_k", "rescale",
           "rescale_reference"]

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "int8_gemm.cpp"

#: every backend, in the order a missing one falls back through
BACKENDS = ("torch", "lowbit", "reference")
_MODES = ("auto",) + BACKENDS
#: the largest M the auto choice times with (larger inputs share its decision)
MAX_TIMED_M = 1024


def intmm_mode() -> str:
    """``LOWBIT_INTMM`` as a mode: ``auto`` (unset, ``1`` or ``0``) or a forced backend name."""
    v = os.environ.get("LOWBIT_INTMM", "auto").strip().lower()
    v = "auto" if v in ("", "1", "0") else v
    if v not in _MODES:
        raise ValueError(f"LOWBIT_INTMM must be one of {', '.join(_MODES)}, 0 or 1; got {v!r}")
    return v


def load_intmm():
    """The compiled extension module, or None (``LOWBIT_INTMM=0``, no compiler / failed build: a warning, once)."""
    if os.environ.get("LOWBIT_INTMM", "1").strip() == "0":
        return None
    return build_once("lowbit_intmm", [_SRC], "lowbit int8 GEMM", "using another int8 GEMM", verbose=False)


def pad_k(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad the last dimension of ``t`` to a multiple of ``multiple`` (zeros add nothing to a dot product)."""
    pad = (-t.shape[-1]) % multiple
    return F.pad(t, (0, pad)) if pad else t


def int_mm_reference(a: torch.Tensor, b: torch.Tensor, amax: int = 128, bmax: int = 128) -> torch.Tensor:
    """Exact ``a @ b.T`` as int32 through a float matmul (see module doc for the exactness bound)."""
    exact32 = a.shape[-1] * amax * bmax < 2 ** 24
    dt = torch.float32 if exact32 else torch.float64
    return (a.to(dt) @ b.to(dt).T).to(torch.int32)


def _torch_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cuda":
        if a.shape[1] == 1:  # torch 2.13's CPU _int_mm returns garbage for K == 1 (N > 1): add a zero column
            a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
        return torch._int_mm(a, b.T)
    # cuBLASLt's int8 GEMM: M > 16, K and N multiples of 8; zero rows/columns add nothing
    m, n = a.shape[0], b.shape[0]
    a = F.pad(pad_k(a, 8), (0, 0, 0, max(0, 17 - m)))
    b = F.pad(pad_k(b, 8), (0, 0, 0, (-n) % 8))
    return torch._int_mm(a.contiguous(), b.T)[:m, :n]


def _lowbit_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mod = load_intmm()
    return mod.gemm_s8s8s32(pad_k(a), b if b.shape[-1] % 32 == 0 else pad_k(b), True)


_RUN = {"torch": _torch_int_mm, "lowbit": _lowbit_int_mm, "reference": int_mm_reference}


@functools.lru_cache(maxsize=None)
def _torch_works(device_type: str) -> bool:
    """Whether ``torch._int_mm`` runs and is exact on this device type (a 17x32x8 probe, once)."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (17, 32), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (8, 32), dtype=torch.int8, generator=g)
    try:
        got = _torch_int_mm(a.to(device_type), b.to(device_type)).cpu()
    except RuntimeError as e:
        log.debug("torch._int_mm fails on %s: %s", device_type, e)
        return False
    return torch.equal(got, (a.long() @ b.long().T).int())


@functools.lru_cache(maxsize=None)
def onednn_works() -> bool:
    """Whether oneDNN's quantized linear (``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise``, CPU) runs
    here and returns exactly ``float(a @ b.T)`` (a 33x64x24 probe with products past 2**24, once)."""
    if os.environ.get("LOWBIT_ONEDNN", "1").strip() == "0" or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 1152), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (24, 1152), dtype=torch.int8, generator=g)
    a[0], b[0] = 127, -128                                   # |acc| = 1152 * 127 * 128 > 2**24: float rounding
    try:
        got = onednn_linear_mm(a, onednn_prepack(b, 33), 24)
    except (RuntimeError, AttributeError) as e:
        log.debug("oneDNN qlinear unavailable: %s", e)
        return False
    return torch.equal(got, int_mm_reference(a, b).float())


def onednn_prepack(b: torch.Tensor, m: int):
    """int8 ``(N, K)`` weight codes in oneDNN's blocked layout for ``m``-row inputs (a copy: as many bytes again)."""
    return torch.ops.onednn.qlinear_prepack(b, [m, b.shape[1]])


def onednn_linear_mm(a: torch.Tensor, packed, n: int) -> torch.Tensor:
    """``float(a @ b.T)`` float32 ``(M, n)`` from int8 ``a`` and :func:`onednn_prepack`'s ``b``: oneDNN's s8 x s8
    matmul (int32 accumulation) with unit scales and zero points, converted once to float32 (as
    :func:`rescale_reference`'s ``acc.float()`` converts the exact int32 result: the same floats)."""
    one = torch.ones(n)
    zero = torch.zeros(n, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, one, zero, None, 1.0, 0, torch.float32, "none", [], "")


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The backends that run on ``device``, in :data:`BACKENDS` order (``reference`` always)."""
    dt = torch.device(device).type
    ok = {"torch": _torch_works(dt), "lowbit": dt == "cpu" and load_intmm() is not None, "reference": True}
    return tuple(b for b in BACKENDS if ok[b])


def _bucket(m: int) -> int:
    """The M a decision is timed at: ``m`` rounded up to a power of two, at most :data:`MAX_TIMED_M`."""
    return min(1 << max(m - 1, 0).bit_length(), MAX_TIMED_M)


def _time_once(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its primitive for the shape on the first call
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class IntMMDispatcher:
    """The backend per ``(device type, threads, M bucket, K, N)``: forced by ``LOWBIT_INTMM`` or measured once.

    ``decisions`` maps each measured key to ``(backend, {backend: seconds})``; ``clear()`` forgets them.
    """

    def __init__(self):
        self.decisions: dict[tuple, tuple[str, dict[str, float]]] = {}
        self._chosen: dict[tuple, str] = {}     # every resolved call key -> backend (the per-call fast path)
        self._lock = threading.RLock()   # choose_linear measures under it, and int_mm takes it again
        self._warned: set[str] = set()
        #: :meth:`choose_linear`'s measured keys -> ``(path, {path: seconds})``
        self.linear_decisions: dict[tuple, tuple[str, dict[str, float]]] = {}

    def clear(self) -> None:
        """Forget the decisions, the logged fallbacks and whether ``torch._int_mm`` / oneDNN's qlinear work."""
        with self._lock:
            self.decisions.clear()
            self._chosen.clear()
            self._warned.clear()
            self.linear_decisions.clear()
            _torch_works.cache_clear()
            onednn_works.cache_clear()

    def choose_linear(self, m: int, k: int, n: int, device: torch.device | str = "cpu") -> str:
        """``"onednn"`` (prepacked weight, :func:`onednn_linear_mm`) or ``"int_mm"`` for an :func:`int_linear` of
        this shape: measured once per (threads, M bucket, K, N) in ``auto`` mode on CPU for ``n <= N_BLOCK``
        (each path with its rescale, the weight packed outside the timing); ``int_mm`` otherwise."""
        dt = device.type if isinstance(device, torch.device) else torch.device(device).type
        if dt != "cpu" or n > N_BLOCK or intmm_mode() != "auto" or not onednn_works():
            return "int_mm"
        key = (torch.get_num_threads(), _bucket(m), k, n)
        hit = self.linear_decisions.get(key)
        if hit is None:
            with self._lock:
                hit = self.linear_decisions.get(key)
                if hit is None:
                    hit = self.linear_decisions[key] = self._measure_linear(key)
        return hit[0]

    def _measure_linear(self, key: tuple) -> tuple[str, dict[str, float]]:
        _, m, k, n = key
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        s, ws = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
        packed = onednn_prepack(b, m)
        times = {"int_mm": _time_once(lambda: rescale(int_mm(a, b), s, ws)),
                 "onednn": _time_once(lambda: rescale(onednn_linear_mm(a, packed, n), s, ws))}
        best = min(times, key=times.get)
        log.debug("int8 linear M~%d K=%d N=%d: %s (%s)", m, k, n, best,
                  ", ".join(f"{b} {t * 1e3:.3f} ms" for b, t in times.items()))
        return best, times

    def _fallback_note(self, wanted: str, device_type: str, used: str) -> None:
        key = f"{wanted}/{device_type}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("int8 GEMM backend %r unavailable on %s; using %r", wanted, device_type, used)

    def choose(self, m: int, k: int, n: int, device: torch.device | str = "cpu") -> str:
        dt = device.type if isinstance(device, torch.device) else torch.device(device).type
        key = (os.environ.get("LOWBIT_INTMM"), torch.get_num_threads(), dt, _bucket(m), k, n)
        hit = self._chosen.get(key)
        if hit is None:
            hit = self._chosen[key] = self._resolve(m, k, n, dt)
        return hit

    def _resolve(self, m: int, k: int, n: int, dt: str) -> str:
        avail = available_backends(dt)
        mode = intmm_mode()
        if mode != "auto":
            if mode in avail:
                return mode
            used = self._auto(m, k, n, dt, avail)
            self._fallback_note(mode, dt, used)
            return used
        return self._auto(m, k, n, dt, avail)

    def _auto(self, m: int, k: int, n: int, dt: str, avail: tuple[str, ...]) -> str:
        fast = [b for b in avail if b != "reference"]
        if "torch" not in avail:  # (a missing C++ kernel is logged by its build, or was switched off)
            self._fallback_note("torch", dt, fast[0] if fast else "reference")
        if len(fast) < 2:
            return fast[0] if fast else "reference"
        key = (dt, torch.get_num_threads(), _bucket(m), k, n)
        hit = self.decisions.get(key)
        if hit is None:
            with self._lock:
                hit = self.decisions.get(key)
                if hit is None:
                    hit = self.decisions[key] = self._measure(key, fast)
        return hit[0]

    @staticmethod
    def _measure(key: tuple, backends: list[str]) -> tuple[str, dict[str, float]]:
        dt, _, m, k, n = key
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(dt)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).to(dt)
        sync = torch.cuda.synchronize if dt == "cuda" else (lambda: None)
        times = {}
        for name in backends:
            fn = _RUN[name]
            times[name] = _time_once(lambda: (fn(a, b), sync()))
        best = min(times, key=times.get)
        log.debug("int8 GEMM %s M~%d K=%d N=%d: %s (%s)", dt, m, k, n, best,
                  ", ".join(f"{b} {t * 1e3:.3f} ms" for b, t in times.items()))
        return best, times


#: the process-wide backend choice (measured decisions are kept here)
dispatcher = IntMMDispatcher()


def int_mm_on(backend: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`int_mm` through the named backend (benchmarks; it must be in :func:`available_backends`)."""
    return _RUN[backend](a, b)


def int_mm_backend(a: torch.Tensor, b: torch.Tensor) -> str:
    """The backend :func:`int_mm` uses for these operands."""
    return dispatcher.choose(a.shape[0], a.shape[1], b.shape[0], a.device)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` exactly, int8 ``(M, K)`` x int8 ``(N, K)`` -> int32 ``(M, N)``, by the chosen backend.

    ``a`` must lie in [-127, 127] (the hand-written kernel's no-saturation condition; the other backends
    take the full int8 range). ``b`` is read in place when it is row-major ``(N, Kp)``, ``Kp`` a multiple
    of 32, as :class:`lowbit.nn.w8a8.QuantizedActLinear` stores it: no backend copies or re-packs it then.
    """
    return _RUN[int_mm_backend(a, b)](a, b)


# ---- the work around the GEMM of a W8A8 linear ----


def epilogue_kernels():
    """The extension when its activation-code and rescale ops run here (AVX-512), else None (plain torch)."""
    mod = load_intmm()
    return mod if mod is not None and mod.epilogue_available() else None


def act_quant_reference(x: torch.Tensor, kp: int, bits: int, scale: torch.Tensor | None = None,
                        idx: torch.Tensor | None = None, inv_k: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation codes of float32 ``x`` ``(M, K)``: int8 ``(M, kp)`` (zero columns from ``K`` on) and the
    scale, ``clamp(round(x / s), -Q, Q)`` with ``Q = 2**(bits-1) - 1`` and ``s`` the static ``(1,)`` ``scale`` or,
    when None, ``max(max|x_m| / Q, 1e-8)`` per row, returned ``(M, 1)``. With ``idx`` (long ``(kp,)``) and ``inv_k``
    (float32 ``(kp,)``) the codes are those of ``x[:, idx] * inv_k`` (the flattening gather, padding included)."""
    if idx is not None:
        x = torch.index_select(x, 1, idx).mul_(inv_k)                # (M, kp) flattened, zero-padded
    q = (1 << (bits - 1)) - 1
    if scale is None:
        scale = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).div_(q).clamp_min_(1e-8)
    t = (x / scale).round_().clamp_(-q, q)
    return F.pad(t.to(torch.int8), (0, kp - x.shape[1])), scale


def act_quant(x: torch.Tensor, kp: int, bits: int, scale: torch.Tensor | None = None,
              idx: torch.Tensor | None = None, inv_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`act_quant_reference`, bit for bit, in one pass per row on an AVX-512 CPU (the C++ ``quant_rows``:
    the gather if any, row max, divide, round half to even, clamp, narrow to int8, zero padding), else by the
    reference."""
    mod = epilogue_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if mod is None:
        return act_quant_reference(x, kp, bits, scale, idx, inv_k)
    q, s = mod.quant_rows(x, kp, bits, scale, idx, inv_k)
    return q, s


def rescale_reference(acc: torch.Tensor, s: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """float32 ``acc * (s * ws) + bias`` for int32 ``acc`` ``(M, N)`` (or its exact float32 conversion), ``s``
    ``(M, 1)`` or ``(1,)``, ``ws`` ``(N,)``."""
    y = acc.float().mul_(s * ws)
    return y.add_(bias) if bias is not None else y


def rescale(acc: torch.Tensor, s: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rescale_reference`, bit for bit (same products, same order, no FMA), in one pass on an AVX-512 CPU,
    into ``out`` (float32 ``(M, N)`` with unit column stride, e.g. a column block of a wider output) or, when None,
    into ``acc``'s own storage (``acc`` is consumed); else the reference (copied into ``out`` if given)."""
    fast = (acc.device.type == "cpu" and acc.is_contiguous() and s.dtype == ws.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32))
    mod = epilogue_kernels() if fast else None
    if mod is None:
        y = rescale_reference(acc, s, ws, bias)
        return y if out is None else out.copy_(y)
    return mod.rescale(acc, s, ws.contiguous(), bias, out)


#: the widest column block of one int8 GEMM call in :func:`int_linear`
N_BLOCK = 4096


def int_linear(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, ws: torch.Tensor,
               bias: torch.Tensor | None = None, packed=None) -> torch.Tensor:
    """``int_mm(a, b) * (s outer ws) + bias`` as float32 ``(M, N)``: :func:`int_mm` then :func:`rescale`.

    ``packed``: a callable returning ``b`` in oneDNN's layout (:func:`onednn_prepack`, made once by the caller
    and kept), offered where :meth:`IntMMDispatcher.choose_linear` measured oneDNN's prepacked s8 matmul the
    faster for this shape; its float output is the same floats as ``int_mm``'s converted, so the result is too.

    A layer wider than :data:`N_BLOCK` output channels (an LM head) runs as column blocks of ``N_BLOCK`` weight
    rows, each rescaled into its columns of one preallocated output. oneDNN's ``_int_mm`` slows down sharply on
    such wide operands: on the project machine (AMX, 2 threads, quiet) 1024 tokens x 576 x 49152 took 114 ms in
    one call and 29 ms as 4096-wide blocks (16384-wide: 115 ms; 1024-wide: 33 ms), 1024 x 640 x 262144 601 ms
    and 171 ms (fp32 ``F.linear``: 242 ms and 1622 ms). The integers are the same either way.
    """
    n = b.shape[0]
    if packed is not None and dispatcher.choose_linear(a.shape[0], a.shape[1], n, a.device) == "onednn":
        return rescale(onednn_linear_mm(a, packed(), n), s, ws, bias)
    if n <= N_BLOCK:
        return rescale(int_mm(a, b), s, ws, bias)
    y = torch.empty(a.shape[0], n, dtype=torch.float32, device=a.device)
    for n0 in range(0, n, N_BLOCK):
        n1 = min(n, n0 + N_BLOCK)
        rescale(int_mm(a, b[n0:n1]), s, ws[n0:n1], None if bias is None else bias[n0:n1], out=y[:, n0:n1])
    return y

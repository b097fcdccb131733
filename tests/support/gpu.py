"""GPU test support: skipping, poisoned outputs, inputs with odd strides, baseline-relative checks.

The kernel is compared with the float64 reference (``bsfa_reference``) only. Tolerances follow
FlashAttention's tests: the kernel's error against float64 must stay within a small multiple of
the error of a plain low-precision computation of the same attention, plus a rounding floor.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes

import numpy as np
import pytest

import bsfa_reference as ref
from bsfa_reference.tiles import diagonal_tiles, expand_tiles, tile_positions, valid_mask

try:
    import cupy as cp

    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no CuPy, or CuPy without a driver
    cp = None
    HAVE_GPU = False

requires_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU (none here; CI has none)")

HOST_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
#: allowed multiple of the low-precision baseline's error
ERR_FACTOR = 3.0
#: share of gated tiles whose keep decision may differ from the float64 reference (|M - t| tiny)
MAX_EXEMPT_SHARE = 0.01


def poison_outputs(monkeypatch):
    """Make every framework allocation inside bsfa_cupy start as garbage (NaN / 0xAB bytes)."""
    from bsfa_cupy import _arrays

    real_empty = _arrays.Frame.empty

    def empty(self, shape, dtype_name):
        native, view = real_empty(self, shape, dtype_name)
        if view.dtype.kind == "f":
            view.fill(np.nan)
        else:
            view.view(cp.uint8).fill(0xAB)
        return native, view

    monkeypatch.setattr(_arrays.Frame, "empty", empty)

    # attention's kept plans allocate through plan._TorchIO / plan._CupyIO
    from bsfa_cupy import plan

    for io in (plan._TorchIO, plan._CupyIO):
        monkeypatch.setattr(io, "empty", _poisoned(io.empty))


def _poisoned(real_empty):
    def empty(self, shape, dtype):  # out and lse: always floating point
        x = real_empty(self, shape, dtype)
        if hasattr(x, "fill_"):  # torch
            x.fill_(float("nan"))
        else:
            x.fill(np.nan)
        return x

    return empty


def device_array(host, layout: str):
    """A CuPy copy of a (B, N, H, D) host array with the given memory layout.

    "contiguous"; "bhnd": stored (B, H, N, D) and viewed transposed; "padded": heads padded by one
    slot and sliced, so the sequence stride is not H*D; all keep the last dim contiguous.
    """
    B, N, H, D = host.shape
    if layout == "contiguous":
        return cp.asarray(host)
    if layout == "bhnd":
        return cp.asarray(np.ascontiguousarray(host.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    if layout == "padded":
        buf = cp.full((B, N, H + 1, D), np.nan, dtype=host.dtype)
        buf[:, :, :H] = cp.asarray(host)
        return buf[:, :, :H]
    raise ValueError(layout)


def random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, dtype, spread=1.0):
    """Host q, k, v in the given dtype; ``spread`` widens the score distribution."""
    ht = HOST_DTYPES[dtype]
    q = (rng.standard_normal((B, Nq, Hq, D)) * spread).astype(ht)
    k = rng.standard_normal((B, Nk, Hkv, D)).astype(ht)
    v = rng.standard_normal((B, Nk, Hkv, D)).astype(ht)
    return q, k, v


def scalar_threshold(tile_max, margin):
    """One threshold for every tile: midway between the two neighbouring distinct tile maxima nearest
    the median whose gap exceeds twice the largest rounding margin (the median itself when none does),
    so that ties at the median (common in bfloat16) do not put many tiles within rounding of it."""
    finite = np.isfinite(tile_max)
    vals = np.unique(tile_max[finite])
    if not vals.size:
        return 0.0
    gap = 2.0 * float(margin[finite].max())
    wide = np.flatnonzero(np.diff(vals) > gap) + 1  # split before vals[i]
    if not wide.size:
        return float(np.median(tile_max[finite]))
    i = wide[np.abs(wide - vals.size // 2).argmin()]
    return float(0.5 * (vals[i - 1] + vals[i]))


def thresholds_from_maxima(tile_max, Nq, Nk, quantile=0.5, margin=None, q_start=None, k_start=0):
    """(Hq, T) float32: per head and query-tile position, a threshold midway between two
    neighbouring gated tile maxima near the given quantile of that tile row.

    Applied to the same inputs this skips about ``quantile`` of the gated (off-diagonal) tiles.
    ``margin`` (B, Hq, nQ, nK), optional: a rounding bound per tile; neighbours closer than twice it
    are not split, so no tile lands within fp32 rounding of its threshold unless nothing else fits.
    ``q_start`` / ``k_start``: the call's offsets (see bsfa_reference.attention).
    """
    B, Hq, nQ, nK = tile_max.shape
    at = dict(q_start=q_start, k_start=k_start)
    gated = (tile_max > -np.inf) & ~diagonal_tiles(Nq, Nk, ref.BLOCK_M, ref.BLOCK_N, **at)[None, None]
    pos = np.maximum(tile_positions(Nq, Nk, ref.BLOCK_M, **at), 0)
    thr = np.full((Hq, int(pos.max()) + 1), -np.inf, dtype=np.float32)
    for h in range(Hq):
        for a in range(nQ):
            sel = gated[:, h, a]
            vals = np.unique(tile_max[:, h, a][sel])  # ascending
            gap = 0.0 if margin is None else 2.0 * float(margin[:, h, a][sel].max(initial=0.0))
            if not vals.size:
                continue
            # midway between two neighbouring maxima, preferring the split nearest the quantile
            # whose gap exceeds the rounding margin; with none, skip or keep the whole row
            target = min(max(int(round(quantile * vals.size)), 1), vals.size - 1)
            splits = np.arange(1, vals.size)
            wide = splits[np.diff(vals) > gap]
            if wide.size:
                i = wide[np.abs(wide - target).argmin()]
                thr[h, pos[a]] = np.float32(0.5 * (vals[i - 1] + vals[i]))
            else:
                thr[h, pos[a]] = vals[-1] + 1.0 if (h + a) % 2 else vals[0] - 1.0
    return thr


def rounding_margin(q, k, causal, D, q_start=None, k_start=0):
    """Per tile, a bound on |fp32 tile max - float64 tile max| (see gate_exemptions)."""
    abs_max = ref.block_max_scores(np.abs(q.astype(np.float64)), np.abs(k.astype(np.float64)), causal=causal,
                                   q_start=q_start, k_start=k_start)
    return abs_max * D * 2.0**-22 + 1e-30


def gate_exemptions(tile_max, abs_max, thresholds, Nq, Nk, D, q_start=None, k_start=0):
    """Tiles whose keep decision may legitimately flip between fp32 and float64 tile maxima.

    A float32 dot product of length D differs from float64 by at most about D * 2^-24 * sum|q||k|;
    ``abs_max`` is the tile maximum of scale * sum|q||k| (the reference on |q|, |k|).
    Returns a (B, Hq, nQ, nK) bool mask of exempt tiles.
    """
    bound = abs_max * D * 2.0**-22 + 1e-30  # as rounding_margin
    if thresholds is None:
        return np.zeros(tile_max.shape, dtype=bool)
    if np.ndim(thresholds) == 0:
        thr = np.full(tile_max.shape[1:3], float(thresholds))
    else:
        T = thresholds.shape[1]
        pos = tile_positions(Nq, Nk, ref.BLOCK_M, q_start=q_start, k_start=k_start)
        thr = np.asarray(thresholds, np.float64)[:, np.clip(pos, 0, T - 1)]
    with np.errstate(invalid="ignore"):  # -inf - -inf where neither counts
        near = np.abs(tile_max - thr[None, :, :, None]) <= bound
    diag = diagonal_tiles(Nq, Nk, ref.BLOCK_M, ref.BLOCK_N, q_start=q_start, k_start=k_start)[None, None]
    return near & ~diag & (tile_max > -np.inf)


def lowp_attention(q, k, v, keep, causal, scale, dtype, q_start=None, k_start=0):
    """A plain low-precision attention (fp32 scores and softmax, P and the output rounded to
    ``dtype``) over the same kept tiles: the baseline error the kernel is measured against."""
    ht = HOST_DTYPES[dtype]
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    q32 = q.astype(np.float32)
    k32 = np.repeat(k.astype(np.float32), g, axis=2)
    v32 = np.repeat(v.astype(np.float32), g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q32, k32).astype(np.float32) * np.float32(scale)
    mask = valid_mask(Nq, Nk, causal, q_start=q_start, k_start=k_start)[None, None] & expand_tiles(keep, Nq, Nk, ref.BLOCK_M, ref.BLOCK_N)
    s = np.where(mask, s, -np.inf).astype(np.float32)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(np.float32)
    p = np.exp(s - m).astype(np.float32)
    l = p.sum(axis=-1, keepdims=True)
    p16 = p.astype(ht).astype(np.float32)
    o = np.einsum("bhij,bjhd->bihd", p16, v32) / np.where(l > 0, l, 1).transpose(0, 2, 1, 3)
    return o.astype(ht).astype(np.float64)


def reference_outputs(q, k, v, keep, causal, scale, dtype, q_start=None, k_start=0):
    """What check_against_reference compares with, computed once: the float64 reference's out and lse
    replaying ``keep`` and the low-precision baseline over the same tiles (all host arrays; see there)."""
    at = dict(q_start=q_start, k_start=k_start)
    ref_out, ref_lse = ref.attention(q, k, v, causal=causal, softmax_scale=scale, keep=keep, return_lse=True, **at)
    return ref_out, ref_lse, lowp_attention(q, k, v, keep, causal, scale, dtype, **at)


def check_against_reference(out, lse, q, k, v, keep, causal, scale, dtype, what="", q_start=None, k_start=0,
                            expected=None):
    """out (B, Nq, Hq, D) and lse (B, Hq, Nq) from the kernel vs the float64 reference replaying
    the kernel's own keep mask; errors bounded relative to the low-precision baseline.
    ``q_start`` / ``k_start``: the call's offsets. ``expected``: reference_outputs of the same
    arguments, where the caller has them already (several kernels checked against one reference)."""
    out = np.asarray(out).astype(np.float64)
    lse = np.asarray(lse).astype(np.float64)
    if expected is None:
        expected = reference_outputs(q, k, v, keep, causal, scale, dtype, q_start=q_start, k_start=k_start)
    ref_out, ref_lse, base = expected
    assert not np.isnan(out).any(), f"{what}: {int(np.isnan(out).sum())} NaN in out"
    assert not np.isnan(lse).any(), f"{what}: {int(np.isnan(lse).sum())} NaN in lse"

    dead = ~np.isfinite(ref_lse)  # rows with no kept valid key: lse -inf and out exactly 0
    assert np.array_equal(lse[dead], ref_lse[dead]), f"{what}: lse of {int(dead.sum())} empty rows not all -inf"
    dead_rows = dead.transpose(0, 2, 1)  # (B, Nq, Hq)
    assert not out[dead_rows].any(), f"{what}: out of empty rows not zero (max {np.abs(out[dead_rows]).max()})"

    base_err = np.abs(base - ref_out).max()
    floor = EPS[dtype] * max(1.0, float(np.abs(ref_out).max()))
    bound = ERR_FACTOR * base_err + floor
    err = np.abs(out - ref_out)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: out error {err.max():.3e} > bound {bound:.3e} (= {ERR_FACTOR} x baseline {base_err:.3e} + "
        f"{floor:.1e}) at {np.unravel_index(err.argmax(), err.shape)}; {int(bad.sum())}/{err.size} mismatches"
    )
    live = ~dead
    lerr = np.abs(lse[live] - ref_lse[live])
    lbound = 1e-4 + 2e-6 * np.abs(ref_lse[live])
    lbad = lerr > lbound
    assert not lbad.any(), (
        f"{what}: lse error {lerr.max():.3e} above 1e-4 + 2e-6|lse|; {int(lbad.sum())}/{lerr.size} mismatches"
    )
    return float(err.max()), float(base_err)


def kernel_backend(backend, D):
    """The wgmma kernels serve head dims 64 and 128 only; the other head dims run on mma.sync."""
    return "sm80" if backend in ("sm90", "sm90ws") and D not in (64, 128) else backend


def run_case(p, monkeypatch, backend, **call):
    """One bsfa_cupy.attention call against the reference: keep (up to fp32 rounding at the threshold),
    out and lse (baseline-relative); returns (note, (out error, baseline error)).
    ``call``: further keyword arguments of the attention call (e.g. num_splits).

    p: dtype, D, causal, B, Hkv, Hq, Nq, Nk, mode ("none", "scalar", "maxima", "short"), layouts,
    spread, seed, and optionally q_start / k_start (the call's offsets, default bottom-right) and k_shift (one
    score offset per K/V head, e.g. to make every score of a head negative).
    """
    backend = kernel_backend(backend, p["D"])
    import bsfa_cupy

    rng = np.random.default_rng(p["seed"])
    q, k, v = random_inputs(rng, p["B"], p["Nq"], p["Nk"], p["Hq"], p["Hkv"], p["D"], p["dtype"], p["spread"])
    if p.get("k_shift") is not None:  # every score of K/V head g moved by 8 * k_shift[g] (through feature 0)
        q[..., 0] = 8
        k[..., 0] += np.asarray(p["k_shift"]).astype(k.dtype)
    scale = 1.0 / np.sqrt(p["D"])
    causal = p["causal"]
    at = dict(q_start=p.get("q_start"), k_start=p.get("k_start", 0))
    tile_max = ref.block_max_scores(q, k, causal=causal, **at)
    margin = rounding_margin(q, k, causal, p["D"], **at)
    if p["mode"] == "none":
        thr = None
    elif p["mode"] == "scalar":
        thr = scalar_threshold(tile_max, margin)
    else:
        thr = thresholds_from_maxima(tile_max, p["Nq"], p["Nk"], margin=margin, **at)
        if p["mode"] == "short":
            thr = thr[:, : max(1, thr.shape[1] // 2)]  # positions past T clamp to T - 1

    qd, kd, vd = (device_array(x, lay) for x, lay in zip((q, k, v), p["layouts"]))
    poison_outputs(monkeypatch)
    out = cp.full(q.shape, np.nan, dtype=q.dtype)
    res_out, lse, keep = bsfa_cupy.attention(qd, kd, vd, thr, causal=causal, out=out, return_lse=True,
                                             return_keep=True, backend=backend, **at, **call)
    cp.cuda.get_current_stream().synchronize()
    assert res_out is out, "out= was not returned as the output array"
    keep_u8 = cp.asnumpy(keep.view(cp.uint8))
    assert set(np.unique(keep_u8)) <= {0, 1}, f"keep has unwritten entries: values {np.unique(keep_u8)}"
    kernel_keep = keep_u8.astype(bool)

    # The gate: same decisions as the reference, except tiles within fp32 rounding of the threshold.
    _, ref_keep = ref.attention(q, k, v, thr, causal=causal, return_keep=True, **at)
    abs_max = ref.block_max_scores(np.abs(q.astype(np.float64)), np.abs(k.astype(np.float64)), causal=causal, **at)
    exempt = gate_exemptions(tile_max, abs_max, None if thr is None else np.asarray(thr, np.float32),
                             p["Nq"], p["Nk"], p["D"], **at)
    differ = (kernel_keep != ref_keep) & ~exempt
    assert not differ.any(), (
        f"keep differs from the reference at {int(differ.sum())} tiles (first {np.argwhere(differ)[:5].tolist()})"
    )
    gated = int((tile_max > -np.inf).sum())
    info = f"exempt tiles: {int(exempt.sum())} of {gated}; kept {int(kernel_keep.sum())}"
    assert exempt.sum() <= MAX_EXEMPT_SHARE * max(gated, 1) + 1, f"{int(exempt.sum())} exempt tiles of {gated}"

    errs = check_against_reference(cp.asnumpy(out), cp.asnumpy(lse), q, k, v, kernel_keep, causal, scale,
                                   p["dtype"], what=str(p), **at)
    return info, errs


def planted_nonfinite(seed, shape, causal, gated, q_at, k_at, v_at):
    """float16 (q, k, v, thresholds or None) of ``shape`` = (B, Nq, Nk, Hq, Hkv, D), thresholds from the clean
    inputs' maxima, then NaN at the first of each ``*_at`` list of indices and inf (k: -inf) at the second."""
    B, Nq, Nk, Hq, Hkv, D = shape
    q, k, v = random_inputs(np.random.default_rng(seed), B, Nq, Nk, Hq, Hkv, D, "float16")
    thr = thresholds_from_maxima(ref.block_max_scores(q, k, causal=causal), Nq, Nk) if gated else None
    for x, at, big in ((q, q_at, np.inf), (k, k_at, -np.inf), (v, v_at, np.inf)):
        x[at[0]] = np.nan
        x[at[1]] = big
    return q, k, v, thr


def swap_sm90ws_entry(monkeypatch, on: list, swap, field: str, seen: list, off=None) -> None:
    """Patch ``ops.get_module``: while ``on[0]``, sm90ws modules come back as ``swap(module)`` with the kernel in
    ``field`` wrapped so that each launch appends its name to ``seen``; otherwise as ``off(module)`` (default:
    the module itself), whose kernel in ``field`` must differ. Undone after the test."""
    from bsfa_cupy import ops

    real = ops.get_module

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        if not on[0]:
            return off(mod) if off is not None else mod
        swapped = swap(mod)
        kern = getattr(swapped, field)
        base = off(mod) if off is not None else mod
        assert kern is not getattr(base, field), f"{key.name()}: no entry to swap in for {field}"

        def spy(*args, _fn=kern.fn, **kw):
            seen.append(field)
            return _fn(*args, **kw)

        return dataclasses.replace(swapped, **{field: dataclasses.replace(kern, fn=spy)})

    monkeypatch.setattr(ops, "get_module", get_module)


def without_head_pairs(monkeypatch) -> None:
    """Patch ``ops.get_module`` so that sm90ws modules send no call to bsfa_fwd_headpair (``Module.head_pairs(False)``),
    for tests that hold the unsplit 128-key entries bitwise to another path (split, packed, dense); that entry's
    64-key blocks round differently and are held to the reference instead (tests/gpu/test_head_pairs.py)."""
    import bsfa_cupy
    from bsfa_cupy import ops

    real = ops.get_module

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        return mod.head_pairs(False) if key.arch == "sm90ws" else mod

    monkeypatch.setattr(ops, "get_module", get_module)
    bsfa_cupy.clear_plan_cache()


def assert_bitwise(names, want, got, what):
    """Each array of ``got`` equal to its counterpart in ``want`` bitwise (NaN matching NaN, bool masks exactly),
    else an AssertionError naming ``what``, the mismatch count and the worst finite difference."""
    for name, a, b in zip(names, want, got):
        a, b = cp.asarray(a), cp.asarray(b)
        assert a.shape == b.shape, f"{name}: shape {b.shape}, expected {a.shape}"
        same = a == b if a.dtype == cp.bool_ else (a == b) | (cp.isnan(a) & cp.isnan(b))
        bad = int((~same).sum())
        if bad:
            diff = cp.abs(a.astype(cp.float32) - b.astype(cp.float32))
            finite = cp.isfinite(diff)
            worst = float(diff[finite].max()) if bool(finite.any()) else float("nan")
            raise AssertionError(f"{name}: {what} differs at {bad} of {a.size} entries (worst finite {worst:.3e})")


def assert_nonfinite_like_reference(q, k, v, causal, out, lse, keep):
    """NaN / ±inf in q, k and v propagate as the reference defines: the kernel's (out, lse, keep), as NumPy,
    against the reference replaying the kernel's tile decisions (the gate itself is tested on finite
    inputs): the same outputs and lse non-finite, every other entry accurate."""
    want_out, want_lse = ref.attention(q, k, v, causal=causal, keep=keep, return_lse=True)
    got_bad, want_bad = ~np.isfinite(out), ~np.isfinite(want_out)
    assert want_bad.any(), "the planted values reached no output: the test checks nothing"
    assert np.array_equal(got_bad, want_bad), (
        f"non-finite outputs differ at {int((got_bad != want_bad).sum())} entries "
        f"(first {np.argwhere(got_bad != want_bad)[:5].tolist()})"
    )
    nan_differ = np.isnan(lse) != np.isnan(want_lse)
    assert not nan_differ.any(), f"NaN lse differ at {np.argwhere(nan_differ)[:5].tolist()}"
    assert np.array_equal(lse == -np.inf, want_lse == -np.inf), "rows without kept keys differ"
    ok = ~want_bad
    err = np.abs(out[ok].astype(np.float64) - want_out[ok])
    tol = 16 * EPS["float16"] * np.abs(v[np.isfinite(v)]).max()
    assert err.max() <= tol, f"finite outputs: worst error {err.max():.3e} > {tol:.3e}, {int((err > tol).sum())} over"
    fin = np.isfinite(want_lse)
    assert np.abs(lse[fin] - want_lse[fin]).max() <= 1e-2, "finite lse differ"

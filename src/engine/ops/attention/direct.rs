//! The CUDA path of [`super::Attention`] without candle ops between the kernels: each query
//! chunk's matrix products (two forward, five backward) are strided-batched cuBLAS calls on the grouped layout
//! ([`crate::engine::cuda::blas`]), the softmax kernels run on the buffers, the logit scale
//! rides on the score GEMM's `alpha`, and in backward `dK`, `dV` accumulate over the chunks in
//! f32 through the GEMMs' `beta` (chunks taken last first, so the first, which covers every
//! key, initialises the sums). Per chunk of a backward that is nine launches where the
//! candle-op path takes about twenty (scaling, padding, casts and adds of its own).
//!
//! Same mathematics as the candle-op path (`LORASCOPE_ATTN_DIRECT=0`), which stays the path on
//! the CPU, for soft-capped scores, for f64 and with `LORASCOPE_FUSED=0`; rounding differs slightly: the scale is applied in the
//! f32 accumulator instead of to the 16-bit queries, and each chunk's `dK`/`dV` is added in f32
//! without first rounding to the compute dtype.

use super::softmax::cuda::{softmax_buf, softmax_grad_buf};
use super::{Attention, query_chunks};
use crate::engine::cuda::blas::{Operand, gemm_batched};
use crate::engine::cuda::launch::Buf;
use crate::engine::ops::{cuda_buf, row_copy};
use candle_core::{CudaDevice, DType, Result, Tensor};

/// Whether attention on `q` under `att` takes this path: the fused kernels apply (CUDA, a
/// dtype with kernels, `LORASCOPE_FUSED` on), no score soft-capping, and
/// `LORASCOPE_ATTN_DIRECT` is not `0`.
pub(super) fn applies(att: &Attention, q: &Tensor) -> bool {
    att.spec.softcap.is_none()
        && crate::engine::cuda::fused_path(q.dtype(), q.device())
        && crate::engine::cuda::direct_attention_on()
}

/// The shapes of one call: batch, query heads, kv heads, positions, head size.
struct Dims {
    b: usize,
    qh: usize,
    kvh: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        if k.dims4()? != (b, kvh, t, d) || v.dims4()? != (b, kvh, t, d) || qh % kvh != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not match",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!("attention: q, k and v dtypes differ");
        }
        Ok(Self { b, qh, kvh, t, d })
    }

    /// Batch members of the grouped layout: one per (sequence, kv head).
    fn groups(&self) -> usize {
        self.b * self.kvh
    }

    /// Query heads per kv head.
    fn g(&self) -> usize {
        self.qh / self.kvh
    }
}

/// Chunk `q0..q0 + tq` of `x` (b, heads, t, d) as a contiguous (b, heads, tq, d) tensor (no
/// copy for the whole row).
fn rows(x: &Tensor, q0: usize, tq: usize) -> Result<Tensor> {
    row_copy(&x.narrow(2, q0, tq)?)
}

/// `S = scale Q K^T` and `P = softmax(S)` for a chunk: `qc` the chunk's grouped queries
/// (groups, g*tq, d), keys `0..keys` of `k` (groups, t, d).
fn probs(
    dev: &CudaDevice,
    att: &Attention,
    s: &Dims,
    (qc, k): (&Buf, &Buf),
    (q0, tq): (usize, usize),
) -> Result<Buf> {
    let (rows_g, keys) = (s.g() * tq, q0 + tq);
    let scores = Buf::alloc(dev, qc.dtype(), s.groups() * rows_g * keys)?;
    gemm_batched(
        dev,
        (rows_g, keys, s.d),
        s.groups(),
        Operand::new(qc, false, s.d, rows_g * s.d),
        Operand::new(k, true, s.d, s.t * s.d),
        (&scores, keys, rows_g * keys),
        att.spec.scale as f32,
        0.0,
    )?;
    let r = (tq, keys, q0);
    softmax_buf(dev, &scores, s.groups() * rows_g, r, att.spec.window_arg())
}

/// Forward: (b, qh, t, d) in `q`'s dtype.
pub(super) fn forward(att: &Attention, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let s = Dims::of(q, k, v)?;
    let dev = q.device().as_cuda_device()?.clone();
    let (kb, vb) = (cuda_buf(k, "attention k")?, cuda_buf(v, "attention v")?);
    let mut outs = Vec::new();
    for (q0, tq) in query_chunks(s.t, att.chunk) {
        let qc = rows(q, q0, tq)?;
        let p = probs(
            &dev,
            att,
            &s,
            (&cuda_buf(&qc, "attention q")?, &kb),
            (q0, tq),
        )?;
        let (rows_g, keys) = (s.g() * tq, q0 + tq);
        let o = Buf::alloc(&dev, q.dtype(), s.groups() * rows_g * s.d)?;
        gemm_batched(
            &dev,
            (rows_g, s.d, keys),
            s.groups(),
            Operand::new(&p, false, keys, rows_g * keys),
            Operand::new(&vb, false, s.d, s.t * s.d),
            (&o, s.d, rows_g * s.d),
            1.0,
            0.0,
        )?;
        outs.push(o.into_tensor((s.b, s.qh, tq, s.d))?);
    }
    match outs.len() {
        1 => Ok(outs.remove(0)),
        _ => Tensor::cat(&outs, 2),
    }
}

/// Backward: `(dq, dk, dv)` for the output gradient `grad` (b, qh, t, d), in `q`'s dtype.
pub(super) fn backward(
    att: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = Dims::of(q, k, v)?;
    let dt = q.dtype();
    let dev = q.device().as_cuda_device()?.clone();
    let (kb, vb) = (cuda_buf(k, "attention k")?, cuda_buf(v, "attention v")?);
    let grad = grad.to_dtype(dt)?;
    let chunks = query_chunks(s.t, att.chunk);
    let single = chunks.len() == 1;
    // dK, dV: in the compute dtype for one chunk; else f32 sums over the chunks.
    let acc = if single { dt } else { DType::F32 };
    // Allocated where the candle-op path makes them: each just before its first product.
    let n_kv = s.groups() * s.t * s.d;
    let (mut dk, mut dv): (Option<Buf>, Option<Buf>) = (None, None);
    let mut dqs = Vec::with_capacity(chunks.len());
    for (i, &(q0, tq)) in chunks.iter().enumerate().rev() {
        let (rows_g, keys) = (s.g() * tq, q0 + tq);
        // The last chunk sees every key: it writes the sums, the others add to them.
        let beta = if i + 1 == chunks.len() { 0.0 } else { 1.0 };
        let qc_t = rows(q, q0, tq)?;
        let go_t = rows(&grad, q0, tq)?;
        let (qc, go) = (
            cuda_buf(&qc_t, "attention q")?,
            cuda_buf(&go_t, "attention grad")?,
        );
        let p = probs(&dev, att, &s, (&qc, &kb), (q0, tq))?;
        // Rows 0..keys of the sum in `slot` (+)= X^T Y, X (groups, g*tq, keys) and Y (groups,
        // g*tq, d): dV from P and dO, dK from dS' and Q.
        let add_kv = |slot: &mut Option<Buf>, x: &Buf, y: &Buf| -> Result<()> {
            let c = match slot {
                Some(c) => c,
                None => slot.insert(Buf::alloc(&dev, acc, n_kv)?),
            };
            gemm_batched(
                &dev,
                (keys, s.d, rows_g),
                s.groups(),
                Operand::new(x, true, keys, rows_g * keys),
                Operand::new(y, false, s.d, rows_g * s.d),
                (c, s.d, s.t * s.d),
                1.0,
                beta,
            )
        };
        add_kv(&mut dv, &p, &go)?;
        // dP = dO V^T
        let dp = Buf::alloc(&dev, dt, s.groups() * rows_g * keys)?;
        gemm_batched(
            &dev,
            (rows_g, keys, s.d),
            s.groups(),
            Operand::new(&go, false, s.d, rows_g * s.d),
            Operand::new(&vb, true, s.d, s.t * s.d),
            (&dp, keys, rows_g * keys),
            1.0,
            0.0,
        )?;
        drop((go, go_t));
        // scale * dS: dQ = dS' K and dK = dS'^T Q.
        let ds = softmax_grad_buf(
            &dev,
            &p,
            &dp,
            s.groups() * rows_g,
            ((tq, keys, q0), att.spec.window_arg()),
            att.spec.scale as f32,
        )?;
        drop((p, dp));
        let dq = Buf::alloc(&dev, dt, s.groups() * rows_g * s.d)?;
        gemm_batched(
            &dev,
            (rows_g, s.d, keys),
            s.groups(),
            Operand::new(&ds, false, keys, rows_g * keys),
            Operand::new(&kb, false, s.d, s.t * s.d),
            (&dq, s.d, rows_g * s.d),
            1.0,
            0.0,
        )?;
        add_kv(&mut dk, &ds, &qc)?;
        dqs.push(dq.into_tensor((s.b, s.qh, tq, s.d))?);
    }
    dqs.reverse();
    let dq = match dqs.len() {
        1 => dqs.remove(0),
        _ => Tensor::cat(&dqs, 2)?,
    };
    let shape = (s.b, s.kvh, s.t, s.d);
    let (Some(dk), Some(dv)) = (dk, dv) else {
        candle_core::bail!("attention backward: no query chunk");
    };
    let (dk, dv) = (dk.into_tensor(shape)?, dv.into_tensor(shape)?);
    Ok((dq, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}

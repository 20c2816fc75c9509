//! CUDA path of [`super::LoraProjection`]: the adapted projection as direct cuBLAS `GemmEx`
//! calls and small NVRTC kernels (`cuda/kernels/lora.cu`), without candle tensor ops in
//! between; and the launcher of the dropout kernel, which [`super::HashDropout`] shares.
//!
//! Why: at batch 2 x 2048 with gradient checkpointing the step was host-bound (on an H200 the
//! host took 364 ms to issue a 365 ms step). Each candle op costs the host tens of
//! microseconds (tensor bookkeeping, layout copies, a fresh allocation), and the adapted
//! projection was ~11 of them forward and ~18 backward, plus a device copy of its input and
//! output at the custom-op boundary. Here forward is 5-7 launches and backward 9-10 (two fewer
//! each inside a layer pass's [`super::CastScope`], which casts the masters once), the
//! scaling and residual adds ride on cuBLAS's `alpha`/`beta`, and the adapter gradients come
//! out of cuBLAS in f32 directly (PEFT: f32 master weights, fp32 gradient accumulation).
//!
//! Maths (row-major; `d(x) = mask * x / (1 - p)`, the regenerable [`super::dropout_keep`]
//! mask; `s = alpha / r`; `A` (r, in), `B` (out, r) f32 masters cast to the compute dtype):
//! - forward: `y = x W^T + b + (d(x) A^T) (s B)^T`;
//! - backward: `du = dy (s B)`, `dB = s dy^T (d(x) A^T)`, `dA = du^T d(x)`,
//!   `dx = dy W + mask * (du A) / (1 - p)`.
//!
//! GEMMs run with `CUBLAS_COMPUTE_32F` (f32 accumulation, as PyTorch's default for 16-bit
//! matmuls), inputs and outputs in the compute dtype except the f32 adapter gradients.

use super::{BaseLinear, HashDropout, LoraProjection};
use crate::engine::cuda::blas::gemm;
use crate::engine::cuda::launch::{
    Arg, Buf, Module, TensorTable, grid_stride, launch, per_row, table_arg, vec8_or,
};
use crate::engine::cuda::{kernel_name, source};
use crate::engine::ops::cuda_buf;
use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Tensor};
use std::sync::Arc;

/// The LoRA family's kernels (`cuda/kernels/lora.cu`), the dropout kernel included.
static MODULE: Module = Module::new("lorascope_lora", source::LORA).with_header(keep_header);

/// `lora_a_dropout_*` (`cuda/kernels/lora_mma.cu`): `d(x) A^T` on tensor cores, sm_80 and newer.
static MMA_MODULE: Module = Module::new("lorascope_lora_mma", source::LORA_MMA)
    .with_header(keep_header)
    .for_arch("compute_80");

/// The dropout hash both LoRA modules share.
fn keep_header() -> String {
    format!("{}\n", source::DROPOUT_KEEP)
}

/// Whether `dev` has tensor-core `mma.sync` for f16/bf16 (compute capability 8.0 or newer).
fn has_mma(dev: &CudaDevice) -> bool {
    dev.cuda_stream()
        .context()
        .compute_capability()
        .is_ok_and(|(major, _)| major >= 8)
}

/// `u = d(x) A^T` (tokens, r) in one `lora_a_dropout_*` launch where it applies (see
/// [`crate::engine::cuda::fused_lora_a_on`], which the caller checks); `None` where it does
/// not (the caller takes the dropout kernel and a GEMM). `x` (tokens, in) and `ac` (r, in) in
/// the compute dtype.
///
/// Errors: device errors.
fn fused_lora_a(
    dev: &CudaDevice,
    d: &HashDropout,
    (x, ac): (&Buf, &Buf),
    (tokens, inp, r): (usize, usize, usize),
) -> Result<Option<Buf>> {
    let dt = x.dtype();
    let aligned = |b: &Buf| b.ptr().is_multiple_of(16);
    if d.p <= 0.0
        || !matches!(dt, DType::F16 | DType::BF16)
        || ac.dtype() != dt
        || !inp.is_multiple_of(32)
        || r == 0
        || r > 64
        || tokens == 0
        || !aligned(x)
        || !aligned(ac)
        || !has_mma(dev)
    {
        return Ok(None);
    }
    let u = Buf::alloc(dev, dt, tokens * r)?;
    let (seed, thr, inv) = d.kernel_args();
    let args = [
        x.arg(),
        ac.arg(),
        u.arg(),
        Arg::U64(tokens as u64),
        Arg::U64(inp as u64),
        Arg::I32(r as i32),
        Arg::U64(seed),
        Arg::U64(thr),
        Arg::F32(inv),
    ];
    let name = kernel_name("lora_a_dropout", dt, "lora projection")?;
    // One 256-thread block per 16 rows.
    launch(
        dev,
        &MMA_MODULE,
        &name,
        per_row(tokens.div_ceil(16), 256),
        &args,
    )?;
    Ok(Some(u))
}

/// At most this many 256-thread blocks per elementwise launch (grid-stride loops cover the
/// rest).
const MAX_BLOCKS: usize = 65_535 * 16;

/// Launch the grid-stride elementwise kernel `root_<dtype>` over `n` elements with `args`.
fn elementwise(dev: &CudaDevice, root: &str, dt: DType, n: usize, args: &[Arg]) -> Result<()> {
    let name = kernel_name(root, dt, "lora projection")?;
    launch(dev, &MODULE, &name, grid_stride(n, MAX_BLOCKS), args)
}

/// Inverted dropout of `x[a..b]` with [`HashDropout`]'s mask (`hash_dropout_*`): the
/// [`HashDropout`] op on CUDA, and `d(x)` of the direct projection.
///
/// Errors: a dtype without a kernel, device errors.
pub(super) fn hash_dropout(
    s: &CudaStorage,
    (a, b): (usize, usize),
    d: &HashDropout,
) -> Result<CudaStorage> {
    let dev = s.device();
    let out = Buf::alloc(dev, s.dtype(), b - a)?;
    dropout_into(dev, d, &Buf::view(s, (a, b))?, &out, b - a)?;
    out.into_storage()
}

/// `out = d(x)` over `n` elements.
fn dropout_into(dev: &CudaDevice, d: &HashDropout, x: &Buf, out: &Buf, n: usize) -> Result<()> {
    let (seed, thr, inv) = d.kernel_args();
    let args = [
        x.arg(),
        out.arg(),
        Arg::U64(n as u64),
        Arg::U64(seed),
        Arg::U64(thr),
        Arg::F32(inv),
    ];
    elementwise_or_8(dev, "hash_dropout", (true, &[x, out]), n, &args)
}

/// [`elementwise`], or its 8-wide twin `root8_<dtype>` when `wide` holds and every buffer in
/// `bufs` allows ([`vec8_or`]); the dtype is the first buffer's.
fn elementwise_or_8(
    dev: &CudaDevice,
    root: &str,
    (wide, bufs): (bool, &[&Buf]),
    n: usize,
    args: &[Arg],
) -> Result<()> {
    let dt = bufs.first().map_or(DType::F32, |b| b.dtype());
    let one = || Ok(grid_stride(n, MAX_BLOCKS));
    let (name, cfg) = vec8_or((root, dt, "lora projection"), n, wide, bufs, one)?;
    launch(dev, &MODULE, &name, cfg, args)
}

/// `A` (r, in) or `s B` (out, r), f32 masters, in the compute dtype.
fn cast(dev: &CudaDevice, src: &Buf, n: usize, dt: DType, scale: f64) -> Result<Buf> {
    if src.dtype() != DType::F32 {
        candle_core::bail!(
            "lora cuda: adapter weights must be f32 masters, got {:?}",
            src.dtype()
        );
    }
    let out = Buf::alloc(dev, dt, n)?;
    let args = [
        src.arg(),
        out.arg(),
        Arg::U64(n as u64),
        Arg::F32(scale as f32),
    ];
    elementwise(dev, "lora_cast", dt, n, &args)?;
    Ok(out)
}

/// One layer pass's adapter masters in the compute dtype: `A` and `s B` of every adapter of
/// a decoder layer in one buffer, written by one `lora_cast_multi_*` launch instead of two
/// `lora_cast_*` launches per projection per pass (the same arithmetic: `dt(master * scale)`).
/// Owned by the layer's [`super::CastScope`]; projections hold [`AdapterCasts`] (weak), so the
/// casts are used only while the scope that made them lives, in which nothing updates the
/// masters.
pub(crate) struct LayerCasts {
    buf: Buf,
    dt: DType,
}

/// One adapter's share of a [`LayerCasts`]: offsets and lengths (elements) of `A` (r, in) and
/// `s B` (out, r).
#[derive(Clone)]
pub(crate) struct AdapterCasts {
    layer: std::sync::Weak<LayerCasts>,
    a: (usize, usize),
    b: (usize, usize),
}

impl std::fmt::Debug for AdapterCasts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdapterCasts {{ a: {:?}, b: {:?} }}", self.a, self.b)
    }
}

impl AdapterCasts {
    /// `(A, s B)` in `dt` for masters of `a_len` and `b_len` elements, with the layer buffer
    /// that holds them; None when the scope has ended or anything differs.
    fn get(&self, dt: DType, a_len: usize, b_len: usize) -> Option<(Arc<LayerCasts>, Buf, Buf)> {
        let layer = self.layer.upgrade()?;
        if layer.dt != dt || self.a.1 != a_len || self.b.1 != b_len {
            return None;
        }
        let (a, b) = (layer.buf.offset(self.a.0), layer.buf.offset(self.b.0));
        Some((layer, a, b))
    }
}

/// Cast every adapter of `adapters` (f32 masters on `dev`) to `dt` in one launch: the layer
/// buffer and each adapter's share, in order.
///
/// Errors: masters that are not f32 CUDA tensors, device errors.
pub(crate) fn cast_layer(
    dev: &CudaDevice,
    dt: DType,
    adapters: &[&super::LoraAdapter],
) -> Result<(Arc<LayerCasts>, Vec<AdapterCasts>)> {
    let total: usize = adapters
        .iter()
        .map(|ad| ad.a.elem_count() + ad.b.elem_count())
        .sum();
    let buf = Buf::alloc(dev, dt, total)?;
    let mut table = TensorTable::new(4);
    let mut spans = Vec::with_capacity(adapters.len());
    let mut offset = 0;
    for ad in adapters {
        let mut span = [(0, 0); 2];
        for (k, (t, scale)) in [(ad.a.as_tensor(), 1.0), (ad.b.as_tensor(), ad.scale)]
            .into_iter()
            .enumerate()
        {
            if t.dtype() != DType::F32 {
                candle_core::bail!("lora cuda: adapter weights must be f32 masters");
            }
            let n = t.elem_count();
            let src = cuda_buf(t, "lora master")?.ptr();
            let dst = buf.offset(offset).ptr();
            let bits = u64::from((scale as f32).to_bits());
            table.push(&[src, dst, n as u64, bits], n.div_ceil(256).max(1) as u64)?;
            span[k] = (offset, n);
            offset += n;
        }
        spans.push((span[0], span[1]));
    }
    if !table.is_empty() {
        let (rows, count, cfg) = table.upload(dev, 256)?;
        let name = kernel_name("lora_cast_multi", dt, "lora projection")?;
        launch(dev, &MODULE, &name, cfg, &[table_arg(dev, &rows), count])?;
    }
    let layer = Arc::new(LayerCasts { buf, dt });
    let casts = spans
        .into_iter()
        .map(|(a, b)| AdapterCasts {
            layer: Arc::downgrade(&layer),
            a,
            b,
        })
        .collect();
    Ok((layer, casts))
}

/// `(A, s B)` in `dt`: the layer pass's casts when `op` holds live ones, else two fresh casts
/// of the masters `a` (r x in elements) and `b` (out x r), and the layer buffer to keep alive
/// while they are used.
fn adapter_casts(
    dev: &CudaDevice,
    op: &LoraProjection,
    (a, a_len): (&Buf, usize),
    (b, b_len): (&Buf, usize),
    dt: DType,
) -> Result<(Option<Arc<LayerCasts>>, Buf, Buf)> {
    if let Some((layer, ac, bc)) = op.casts.as_ref().and_then(|c| c.get(dt, a_len, b_len)) {
        return Ok((Some(layer), ac, bc));
    }
    let ac = cast(dev, a, a_len, dt, 1.0)?;
    let bc = cast(dev, b, b_len, dt, op.scale)?;
    Ok((None, ac, bc))
}

/// The selftest of [`fused_lora_a`] (`lorascope selftest`): on a GPU with tensor-core `mma`
/// (whether or not `LORASCOPE_FUSED_LORA_A` turns it on for training), `u = d(x) A^T` from the
/// fused kernel against the dropout kernel and the cuBLAS GEMM it replaces, in f16 and bf16,
/// over shapes with a partial last row block, fewer k chunks than warps, a rank that is not a
/// multiple of 8 (20: a partial n8 tile), and the largest rank (64). Returns one
/// `(name, max |fused - reference| / max |reference|)` per case; none where the fused kernel
/// does not apply to this GPU.
///
/// Errors: the fused kernel declining a case it should take, device errors.
pub(crate) fn fused_lora_a_check(dev: &CudaDevice) -> Result<Vec<(String, f64)>> {
    use rand::{Rng, SeedableRng};
    if !has_mma(dev) {
        return Ok(Vec::new());
    }
    let device = candle_core::Device::Cuda(dev.clone());
    let cpu = candle_core::Device::Cpu;
    let mut out = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        for (tokens, inp, r) in [
            (100, 96, 8),
            (300, 1536, 16),
            (37, 512, 24),
            (33, 256, 20),
            (64, 8960, 64),
        ] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((tokens * inp + r) as u64);
            let mut v = |n: usize| -> Result<Tensor> {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
                Tensor::from_vec(v, n, &cpu)?
                    .to_dtype(dt)?
                    .to_device(&device)
            };
            let (x, a) = (v(tokens * inp)?, v(r * inp)?);
            let (xb, ab) = (
                crate::engine::ops::cuda_buf(&x, "lora A check")?,
                crate::engine::ops::cuda_buf(&a, "lora A check")?,
            );
            let d = HashDropout { p: 0.1, seed: 7 };
            let fused = fused_lora_a(dev, &d, (&xb, &ab), (tokens, inp, r))?.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "lora A check: the fused kernel declined {tokens} x {inp}, rank {r}"
                ))
            })?;
            let xd = Buf::alloc(dev, dt, tokens * inp)?;
            dropout_into(dev, &d, &xb, &xd, tokens * inp)?;
            let reference = Buf::alloc(dev, dt, tokens * r)?;
            gemm(
                dev,
                (tokens, r, inp),
                &xd,
                false,
                &ab,
                true,
                &reference,
                1.0,
                0.0,
            )?;
            let host = |b: Buf| -> Result<Vec<f32>> {
                b.into_tensor(tokens * r)?
                    .to_dtype(DType::F32)?
                    .to_device(&cpu)?
                    .to_vec1()
            };
            let (f, g) = (host(fused)?, host(reference)?);
            let scale = g
                .iter()
                .fold(0f64, |m, y| m.max(y.abs() as f64))
                .max(f64::MIN_POSITIVE);
            let e = f
                .iter()
                .zip(&g)
                .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64 / scale));
            out.push((
                format!("lora A + dropout, {dt:?}, {tokens}x{inp}, r {r}"),
                e,
            ));
        }
    }
    Ok(out)
}

/// `d(x)`, or `x` itself (borrowed) without dropout.
fn dropped(dev: &CudaDevice, op: &LoraProjection, x: &Buf, n: usize) -> Result<Buf> {
    if op.dropout <= 0.0 {
        return Ok(x.borrow());
    }
    let out = Buf::alloc(dev, x.dtype(), n)?;
    dropout_into(dev, &op.hash_dropout(), x, &out, n)?;
    Ok(out)
}

/// The base weight (out, in) in `dt` (NF4: a fresh dequantised copy) and its bias.
fn base_weight(base: &BaseLinear, dt: DType) -> Result<(Tensor, Option<Tensor>)> {
    let w = base.weight(dt)?.contiguous()?;
    let b = base
        .bias()
        .map(|b| b.to_dtype(dt)?.contiguous())
        .transpose()?;
    Ok((w, b))
}

/// Forward on CUDA storages: `x` (tokens, in), `A` (r, in) f32, `B` (out, r) f32, all
/// contiguous. Returns `y` (tokens, out) in `x`'s dtype.
///
/// Errors: shapes that do not match the base weight, unsupported dtypes, device errors.
pub(crate) fn forward(
    op: &LoraProjection,
    (sx, lx): (&CudaStorage, &Layout),
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = sx.device().clone();
    let dt = sx.dtype();
    let (tokens, inp) = lx.shape().dims2()?;
    let (r, inp_a) = la.shape().dims2()?;
    let (out, r_b) = lb.shape().dims2()?;
    let (w_out, w_in) = op.base.shape();
    if inp_a != inp || r_b != r || w_in != inp || w_out != out {
        candle_core::bail!(
            "lora cuda: x {:?}, A {:?}, B {:?}, base ({w_out}, {w_in})",
            lx.shape(),
            la.shape(),
            lb.shape()
        );
    }
    if sa.dtype() != DType::F32 || sb.dtype() != DType::F32 {
        candle_core::bail!("lora cuda: adapter weights must be f32 masters");
    }
    let x = Buf::view(sx, contiguous(lx)?)?;
    let y = Buf::alloc(&dev, dt, tokens * out)?;
    let (w, bias) = base_weight(&op.base, dt)?;
    let beta = match &bias {
        Some(b) if b.elem_count() != out => {
            candle_core::bail!("lora cuda: bias {:?} for {out} outputs", b.shape())
        }
        Some(b) => {
            let b = cuda_buf(b, "lora bias")?;
            let n = tokens * out;
            let args = [y.arg(), b.arg(), Arg::U64(n as u64), Arg::U64(out as u64)];
            // Eight at a time needs whole groups of 8 per row.
            let wide = out.is_multiple_of(8);
            elementwise_or_8(&dev, "lora_bias_rows", (wide, &[&y, &b]), n, &args)?;
            1.0
        }
        None => 0.0,
    };
    gemm(
        &dev,
        (tokens, out, inp),
        &x,
        false,
        &cuda_buf(&w, "lora base weight")?,
        true,
        &y,
        1.0,
        beta,
    )?;
    drop(w);
    let (a, b) = (
        Buf::view(sa, contiguous(la)?)?,
        Buf::view(sb, contiguous(lb)?)?,
    );
    let (_held, ac, bc) = adapter_casts(&dev, op, (&a, r * inp), (&b, out * r), dt)?;
    let fused = if crate::engine::cuda::fused_lora_a_on() {
        fused_lora_a(&dev, &op.hash_dropout(), (&x, &ac), (tokens, inp, r))?
    } else {
        None
    };
    let u = match fused {
        Some(u) => u,
        None => {
            let xd = dropped(&dev, op, &x, tokens * inp)?;
            let u = Buf::alloc(&dev, dt, tokens * r)?;
            gemm(&dev, (tokens, r, inp), &xd, false, &ac, true, &u, 1.0, 0.0)?;
            u
        }
    };
    gemm(&dev, (tokens, out, r), &u, false, &bc, true, &y, 1.0, 1.0)?;
    y.into_storage()
}

/// Backward on detached CUDA tensors: `x` (tokens, in), `a` (r, in) f32, `b` (out, r) f32,
/// `dy` (tokens, out). Returns `(dx, dA, dB)`: `dx` in `x`'s dtype, `dA`, `dB` f32.
///
/// The adapter gradients come first, from `d(x)`; `d(x)` and `x` are then dropped, and `dx`
/// is built in one buffer (with dropout: `inv du A`, masked in place, then `+= dy W` through
/// the GEMM's `beta`), so at most two (tokens, in) buffers are alive at once: `x` and `d(x)`,
/// then `x` and `dx`. With `exclusive` the caller hands over the only handle on `x`'s storage:
/// `d(x)` is written over `x` and `x` is freed before `dx` exists, so one (tokens, in) buffer
/// is alive at a time. Not exclusive, `x` is left as it was.
///
/// Errors: shapes that do not match, unsupported dtypes, device errors.
pub(crate) fn backward(
    op: &LoraProjection,
    x: Tensor,
    exclusive: bool,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("lora cuda: expected a CUDA tensor");
    };
    let dev = dev.clone();
    let dev = &dev;
    let dt = x.dtype();
    // Moved, not shadowed: a shadowed `x` would keep its storage alive to the end of the
    // function, past `drop(x)` below. Not contiguous: a fresh copy, this function's alone.
    let x = if x.is_contiguous() {
        x
    } else {
        x.contiguous()?
    };
    let dy = dy.to_dtype(dt)?.contiguous()?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (tokens, inp) = x.dims2()?;
    let (r, _) = a.dims2()?;
    let (out, r_b) = b.dims2()?;
    if dy.dims2()? != (tokens, out)
        || a.dims2()? != (r, inp)
        || r_b != r
        || op.base.shape() != (out, inp)
        || a.dtype() != DType::F32
        || b.dtype() != DType::F32
    {
        candle_core::bail!(
            "lora cuda backward: x {:?}, dy {:?}, A {:?}, B {:?}",
            x.shape(),
            dy.shape(),
            a.shape(),
            b.shape()
        );
    }
    let n = tokens * inp;
    let dyb = cuda_buf(&dy, "lora gradient")?;
    let (a, b) = (cuda_buf(&a, "lora A")?, cuda_buf(&b, "lora B")?);
    let (_held, ac, bc) = adapter_casts(dev, op, (&a, r * inp), (&b, out * r), dt)?;
    // 1. dB and dA from d(x).
    let (du, da, db) = {
        let xb = cuda_buf(&x, "lora input")?;
        let xd = if exclusive && op.dropout > 0.0 {
            dropout_into(dev, &op.hash_dropout(), &xb, &xb, n)?;
            xb.borrow()
        } else {
            dropped(dev, op, &xb, n)?
        };
        let u = Buf::alloc(dev, dt, tokens * r)?;
        gemm(dev, (tokens, r, inp), &xd, false, &ac, true, &u, 1.0, 0.0)?;
        let du = Buf::alloc(dev, dt, tokens * r)?;
        gemm(
            dev,
            (tokens, r, out),
            &dyb,
            false,
            &bc,
            false,
            &du,
            1.0,
            0.0,
        )?;
        let db = Buf::alloc(dev, DType::F32, out * r)?;
        gemm(
            dev,
            (out, r, tokens),
            &dyb,
            true,
            &u,
            false,
            &db,
            op.scale as f32,
            0.0,
        )?;
        let da = Buf::alloc(dev, DType::F32, r * inp)?;
        gemm(dev, (r, inp, tokens), &du, true, &xd, false, &da, 1.0, 0.0)?;
        (du, da, db)
    };
    drop(x);
    // 2. dx = dy W + mask * (du A) / (1 - p).
    let dx = Buf::alloc(dev, dt, n)?;
    let beta = if op.dropout > 0.0 {
        let (seed, thr, inv) = op.hash_dropout().kernel_args();
        gemm(dev, (tokens, inp, r), &du, false, &ac, false, &dx, inv, 0.0)?;
        // The mask alone (scale 1): `inv` rode on the GEMM's alpha.
        let args = [
            dx.arg(),
            dx.arg(),
            Arg::U64(n as u64),
            Arg::U64(seed),
            Arg::U64(thr),
            Arg::F32(1.0),
        ];
        elementwise_or_8(dev, "hash_dropout", (true, &[&dx, &dx]), n, &args)?;
        1.0
    } else {
        0.0
    };
    let w = op.base.weight(dt)?.contiguous()?;
    gemm(
        dev,
        (tokens, inp, out),
        &dyb,
        false,
        &cuda_buf(&w, "lora base weight")?,
        false,
        &dx,
        1.0,
        beta,
    )?;
    drop(w);
    if op.dropout <= 0.0 {
        gemm(dev, (tokens, inp, r), &du, false, &ac, false, &dx, 1.0, 1.0)?;
    }
    Ok((
        dx.into_tensor((tokens, inp))?,
        da.into_tensor((r, inp))?,
        db.into_tensor((out, r))?,
    ))
}

/// The contiguous range of an input layout.
fn contiguous(l: &Layout) -> Result<(usize, usize)> {
    crate::engine::ops::contiguous_range(l, "lora cuda")
}

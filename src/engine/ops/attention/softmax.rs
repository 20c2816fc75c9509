//! The causal row softmax of attention scores and its backward, one fused kernel each
//! (`cuda/kernels/attention.cu` on CUDA, the same formulas as loops on the CPU), for the
//! query chunks of [`super::causal_attention`].

#[cfg(feature = "cuda")]
use crate::engine::ops::contiguous_range;
use crate::engine::ops::{CpuLoops, cpu_map};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, WithDType};

/// Row softmax of scores (..., rows, keys) under a causal mask, in place of the scores'
/// dtype: row `r` is query position `i = q0 + r % t` and sees keys `0..=i` (with a window
/// `W > 0`: keys `i - W < j <= i`); masked entries are 0. Max, exponentials and the sum are
/// f32 (f64 for f64 input). Unchunked attention has `q0 = 0` and `keys = t`.
pub struct CausalSoftmax {
    /// Query positions per sequence in the rows (rows repeat positions every `t`).
    pub t: usize,
    /// Row length: the chunk's keys (at least `q0 + t`).
    pub keys: usize,
    /// Position of the rows' first query.
    pub q0: usize,
    /// Sliding window in keys, 0 for none.
    pub window: usize,
}

/// Softmax backward for [`CausalSoftmax`]: from probabilities `P` and their gradient `dP`
/// (same shape), `dS = scale * P * (dP - rowsum(P * dP))`, 0 where masked.
pub struct CausalSoftmaxGrad {
    /// Query positions per sequence, as [`CausalSoftmax::t`].
    pub t: usize,
    /// Row length, as [`CausalSoftmax::keys`].
    pub keys: usize,
    /// First query position, as [`CausalSoftmax::q0`].
    pub q0: usize,
    /// Factor applied to the result (the attention scale).
    pub scale: f64,
    /// Sliding window, as [`CausalSoftmax::window`].
    pub window: usize,
}

/// Rows of a (..., rows, keys) layout whose rows cover query positions `q0..q0 + t` (every
/// query must see at most `keys` keys).
fn check_rows(l: &Layout, (t, keys, q0): (usize, usize, usize), what: &str) -> Result<usize> {
    let n = l.shape().elem_count();
    if t == 0 || keys < q0 + t || l.shape().dims().last() != Some(&keys) {
        candle_core::bail!(
            "{what}: last dimension must be {keys} (>= {q0} + {t}), got {:?}",
            l.shape()
        );
    }
    Ok(n / keys)
}

impl CausalSoftmax {
    fn rows(&self) -> (usize, usize, usize) {
        (self.t, self.keys, self.q0)
    }
}

impl CausalSoftmaxGrad {
    /// Rows of `P` (`l1`), checked against `dP` (`l2`).
    fn check(&self, l1: &Layout, l2: &Layout) -> Result<usize> {
        let rows = check_rows(l1, (self.t, self.keys, self.q0), self.name())?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "causal-softmax-grad: P {:?} vs dP {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        Ok(rows)
    }
}

impl CpuLoops for CausalSoftmax {
    const NAME: &'static str = "causal-softmax";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        Ok(cpu::softmax(xs[0], self.rows(), self.window))
    }
}

impl CpuLoops for CausalSoftmaxGrad {
    const NAME: &'static str = "causal-softmax-grad";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        Ok(cpu::softmax_grad(
            xs[0],
            xs[1],
            (self.t, self.keys, self.q0),
            self.scale,
            self.window,
        ))
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        check_rows(l, self.rows(), self.name())?;
        Ok((cpu_map(self, &[(s, l)])?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = check_rows(l, self.rows(), self.name())?;
        let range = contiguous_range(l, self.name())?;
        let out = cuda::softmax((s, range), rows, self.rows(), self.window)?;
        Ok((out, l.shape().clone()))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        <Self as CpuLoops>::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2)?;
        Ok((cpu_map(self, &[(s1, l1), (s2, l2)])?, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = self.check(l1, l2)?;
        let r1 = contiguous_range(l1, self.name())?;
        let r2 = contiguous_range(l2, self.name())?;
        let out = cuda::softmax_grad(
            (s1, r1),
            (s2, r2),
            rows,
            ((self.t, self.keys, self.q0), self.window),
            self.scale as f32,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

mod cpu {
    //! The kernels' formulas as loops (f64 statistics, one rounding to the storage dtype).
    use candle_core::WithDType;

    /// The visible keys `lo..valid` of row `r` (query position `q0 + r % t`) under window `w`.
    fn span(r: usize, t: usize, q0: usize, w: usize) -> (usize, usize) {
        let valid = q0 + r % t + 1;
        let lo = if w > 0 { valid.saturating_sub(w) } else { 0 };
        (lo, valid)
    }

    /// Rows of `keys` scores covering query positions `q0..q0 + t` (`(t, keys, q0)`).
    pub fn softmax<T: WithDType>(
        s: &[T],
        (t, keys, q0): (usize, usize, usize),
        w: usize,
    ) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); s.len()];
        for (r, (row, o)) in s.chunks(keys).zip(out.chunks_mut(keys)).enumerate() {
            let (lo, valid) = span(r, t, q0, w);
            let m = row[lo..valid]
                .iter()
                .map(|x| x.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row[lo..valid]
                .iter()
                .map(|x| (x.to_f64() - m).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            for (o, e) in o[lo..valid].iter_mut().zip(e) {
                *o = T::from_f64(e / sum);
            }
        }
        out
    }

    pub fn softmax_grad<T: WithDType>(
        p: &[T],
        dp: &[T],
        (t, keys, q0): (usize, usize, usize),
        scale: f64,
        w: usize,
    ) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); p.len()];
        for (r, ((pr, dr), o)) in p
            .chunks(keys)
            .zip(dp.chunks(keys))
            .zip(out.chunks_mut(keys))
            .enumerate()
        {
            let (lo, valid) = span(r, t, q0, w);
            let delta: f64 = pr[lo..valid]
                .iter()
                .zip(&dr[lo..valid])
                .map(|(a, b)| a.to_f64() * b.to_f64())
                .sum();
            for j in lo..valid {
                o[j] = T::from_f64(scale * pr[j].to_f64() * (dr[j].to_f64() - delta));
            }
        }
        out
    }
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    //! Launchers of `cuda/kernels/attention.cu`: one 256-thread block per score row, the
    //! row in registers with 16-byte accesses when it allows (`*8_*`).
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch, name8, per_row, vec8};
    use crate::engine::cuda::source;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaDevice, CudaStorage, Result};

    static MODULE: Module = Module::new("lorascope_attention", source::ATTENTION);

    type In<'a> = (&'a CudaStorage, (usize, usize));

    /// One block per row (grid.x allows 2^31 - 1 blocks).
    fn cfg(rows: usize) -> Result<LaunchConfig> {
        if rows > i32::MAX as usize {
            candle_core::bail!(
                "causal softmax: {rows} rows exceed one CUDA grid; lower the batch size"
            );
        }
        Ok(per_row(rows, 256))
    }

    /// Query positions per sequence, row length and first query position of the rows.
    type Rows = (usize, usize, usize);

    /// Keys per row the 8-wide kernels hold: 8 values x 256 threads x `SM_GROUPS` (4).
    const MAX_KEYS8: usize = 8 * 256 * 4;

    /// The kernel `root8_<dtype>` when rows of `keys` allow it and every buffer is aligned
    /// ([`vec8`]), else `root_<dtype>`.
    fn kernel(root: &str, dt: candle_core::DType, keys: usize, bufs: &[&Buf]) -> Result<String> {
        let wide = keys.is_multiple_of(8) && keys <= MAX_KEYS8 && vec8(bufs.iter().copied());
        name8(root, dt, "causal softmax", wide)
    }

    fn i32s((t, keys, q0): Rows) -> [Arg; 3] {
        [
            Arg::I32(t as i32),
            Arg::I32(keys as i32),
            Arg::I32(q0 as i32),
        ]
    }

    /// [`super::CausalSoftmax`] over `rows` score rows laid out as `r`, window `w` (0: none).
    pub fn softmax((s, range): In, rows: usize, r: Rows, w: usize) -> Result<CudaStorage> {
        softmax_buf(s.device(), &Buf::view(s, range)?, rows, r, w)?.into_storage()
    }

    /// [`softmax`] of the scores `x` (`rows` x `r.1` elements) into a fresh buffer.
    pub fn softmax_buf(dev: &CudaDevice, x: &Buf, rows: usize, r: Rows, w: usize) -> Result<Buf> {
        let out = Buf::alloc(dev, x.dtype(), rows * r.1)?;
        let name = kernel("causal_softmax", x.dtype(), r.1, &[x, &out])?;
        let [t, keys, q0] = i32s(r);
        let args = [
            x.arg(),
            out.arg(),
            t,
            keys,
            q0,
            Arg::I32(w.min(i32::MAX as usize) as i32),
        ];
        launch(dev, &MODULE, &name, cfg(rows)?, &args)?;
        Ok(out)
    }

    /// [`super::CausalSoftmaxGrad`] of `P`, `dP` (`rows` rows laid out as `r`).
    pub fn softmax_grad(
        (p, pr): In,
        (dp, dpr): In,
        rows: usize,
        (r, w): (Rows, usize),
        scale: f32,
    ) -> Result<CudaStorage> {
        let (pb, dpb) = (Buf::view(p, pr)?, Buf::view(dp, dpr)?);
        softmax_grad_buf(p.device(), &pb, &dpb, rows, (r, w), scale)?.into_storage()
    }

    /// [`softmax_grad`] of the buffers `pb`, `dpb` (`rows` x `r.1` elements each) into a fresh
    /// buffer.
    pub fn softmax_grad_buf(
        dev: &CudaDevice,
        pb: &Buf,
        dpb: &Buf,
        rows: usize,
        (r, w): (Rows, usize),
        scale: f32,
    ) -> Result<Buf> {
        if pb.dtype() != dpb.dtype() {
            candle_core::bail!("causal-softmax-grad: P and dP dtypes differ");
        }
        let out = Buf::alloc(dev, pb.dtype(), rows * r.1)?;
        let name = kernel("causal_softmax_grad", pb.dtype(), r.1, &[pb, dpb, &out])?;
        let [t, keys, q0] = i32s(r);
        let args = [
            pb.arg(),
            dpb.arg(),
            out.arg(),
            t,
            keys,
            q0,
            Arg::F32(scale),
            Arg::I32(w.min(i32::MAX as usize) as i32),
        ];
        launch(dev, &MODULE, &name, cfg(rows)?, &args)?;
        Ok(out)
    }
}

//! Causal grouped-query attention with its own backward.
//!
//! `softmax(cap(scale Q K^T) + causal mask) V`, as `torch.nn.functional.scaled_dot_product_attention(
//! ..., is_causal=True)` and transformers' `eager_attention_forward` with `repeat_kv` head
//! grouping ([`AttentionSpec`]): `scale` is `1/sqrt(d)` (Gemma: `query_pre_attn_scalar ** -0.5`),
//! `cap(s) = tanh(s / c) * c` with Gemma 2's `attn_logit_softcapping` `c` (identity without),
//! and a sliding window `W` restricts query `i` to keys `i - W < j <= i` (transformers'
//! `sliding_window_causal_mask`). Soft-capping runs as candle ops around the softmax kernels
//! (its backward multiplies `dS` by `1 - tanh^2`); the window is an argument of the kernels. The matrix products run
//! through candle's batched matmul (cuBLAS on CUDA, tensor cores in fp16/bf16, f32
//! accumulation) in the compute dtype, like Hugging Face's eager attention; the causal mask,
//! the row softmax (f32 statistics) and the softmax backward are one fused kernel each
//! ([`CausalSoftmax`], [`CausalSoftmaxGrad`]: NVRTC on CUDA, loops on CPU), so the (T x T)
//! scores are read and written once per pass instead of once per elementwise op.
//!
//! Backward recomputes the probabilities from Q and K (nothing of size T x T is kept between
//! forward and backward), following FlashAttention's recomputation (Dao et al. 2022):
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K / sqrt(d)`,
//! `dK = dS^T Q / sqrt(d)`. Query heads are grouped per key/value head as
//! (batch, kv_heads, group * T, d), so K and V are never repeated and `dK`, `dV` sum over the
//! group inside the matmul.
//!
//! The softmax kernels are the only path on either device (`LORASCOPE_FUSED=0` leaves
//! attention as it is): CUDA launches `cuda/kernels/attention.cu`, the CPU runs their loops.
//! `generic` (tests only) is attention from differentiable candle primitives, the reference.

#[cfg(feature = "cuda")]
use super::contiguous_range;
use super::{CpuLoops, cpu_in, cpu_map, cpu_out};
use crate::engine::profiler;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};

/// The attention variant of one layer: logit scale, sliding window, score soft-capping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies `Q K^T` (`1/sqrt(head_dim)` unless the model says otherwise).
    pub scale: f64,
    /// Keys visible to a query, itself included (None: the whole causal prefix).
    pub window: Option<usize>,
    /// Gemma 2 `attn_logit_softcapping`: scores become `tanh(s / cap) * cap` before the mask.
    pub softcap: Option<f64>,
}

impl AttentionSpec {
    /// Plain causal attention with scale `1/sqrt(head_dim)`.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            window: None,
            softcap: None,
        }
    }

    /// The kernels' window argument: 0 for none.
    fn window_arg(&self) -> usize {
        self.window.unwrap_or(0)
    }
}

/// Causal scaled-dot-product attention with grouped-query attention, as `spec` says.
///
/// `q`: (batch, q_heads, seq, head_dim); `k`, `v`: (batch, kv_heads, seq, head_dim) with
/// `q_heads % kv_heads == 0` (query head `h` reads kv head `h / (q_heads / kv_heads)`, as HF
/// `repeat_kv`); all in the compute dtype. Output (batch, q_heads, seq, head_dim) in that dtype.
/// Scores and probabilities are held in the compute dtype (softmax statistics in f32), as
/// PyTorch's math attention in fp16/bf16. Backward recomputes the probabilities.
///
/// Errors: mismatched shapes or dtypes, device errors (CUDA: kernel compile/launch, out of
/// memory for the (batch, q_heads, seq, seq) scores).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: AttentionSpec) -> Result<Tensor> {
    let (_, qh, _, _) = q.dims4()?;
    let kvh = k.dim(1)?;
    if kvh == 0 || qh % kvh != 0 {
        candle_core::bail!("attention: {qh} query heads do not group over {kvh} kv heads");
    }
    if q.track_op() || k.track_op() || v.track_op() {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention(spec))
    } else {
        Attention(spec).forward(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?)
    }
}

/// Gradients `(dq, dk, dv)` of [`causal_attention`] for the output gradient `grad`
/// (batch, q_heads, seq, head_dim), on untracked inputs (the hand-written backward of a
/// checkpointed layer). Recomputes the probabilities; shapes and dtypes as the inputs.
///
/// Errors: as [`causal_attention`].
pub(crate) fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    spec: AttentionSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, grad) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        grad.contiguous()?,
    );
    let (dq, dk, dv) = profiler::section("causal-attention", "bwd", q.device(), || {
        Attention(spec).backward(&q, &k, &v, &grad)
    })?;
    match (dq, dk, dv) {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => candle_core::bail!("attention backward returned no gradient"),
    }
}

struct Attention(AttentionSpec);

impl Attention {
    /// Probabilities (b, kvh, g*t, t) in the compute dtype from grouped, pre-scaled queries,
    /// with the soft-capped scores divided by the cap (`tanh(s / cap)`) when capping.
    fn probs(&self, qs_g: &Tensor, k: &Tensor, t: usize) -> Result<(Tensor, Option<Tensor>)> {
        let s = qs_g.matmul(&k.t()?)?;
        let window = self.0.window_arg();
        match self.0.softcap {
            None => Ok((s.apply_op1_no_bwd(&CausalSoftmax { t, window })?, None)),
            Some(cap) => {
                let th = s.affine(1.0 / cap, 0.0)?.tanh()?;
                let p = th
                    .affine(cap, 0.0)?
                    .apply_op1_no_bwd(&CausalSoftmax { t, window })?;
                Ok((p, Some(th)))
            }
        }
    }

    /// Queries grouped per kv head, (b, kvh, g*t, d), scaled by the spec's scale.
    fn grouped_scaled(&self, q: &Tensor, kvh: usize) -> Result<Tensor> {
        let (b, qh, t, d) = q.dims4()?;
        q.reshape((b, kvh, (qh / kvh) * t, d))?
            .affine(self.0.scale, 0.0)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, qh, t, d) = q.dims4()?;
        let (p, _) = self.probs(&self.grouped_scaled(q, k.dim(1)?)?, k, t)?;
        p.matmul(v)?.reshape((b, qh, t, d))
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let scale = self.0.scale;
        let qs = self.grouped_scaled(q, kvh)?;
        let (p, th) = self.probs(&qs, k, t)?;
        drop(qs);
        let go = grad
            .to_dtype(q.dtype())?
            .contiguous()?
            .reshape((b, kvh, (qh / kvh) * t, d))?;
        let dv = p.t()?.matmul(&go)?;
        let dp = go.matmul(&v.t()?)?;
        drop(go);
        // scale * dS, so that dQ = dS' K and dK = dS'^T Q; soft-capping multiplies dS by
        // d cap(s) / ds = 1 - tanh(s / cap)^2.
        let window = self.0.window_arg();
        let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxGrad { t, scale, window })?;
        let ds = match th {
            Some(th) => (ds * (1.0 - th.sqr()?)?)?,
            None => ds,
        };
        drop((p, dp));
        let dq = ds.matmul(k)?.reshape((b, qh, t, d))?;
        let qg = q.reshape((b, kvh, (qh / kvh) * t, d))?;
        let dk = ds.t()?.matmul(&qg)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_out(self.forward(&cpu_in(s1, l1)?, &cpu_in(s2, l2)?, &cpu_in(s3, l3)?)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::{cuda_in, cuda_out};
        let q = cuda_in(s1, l1)?;
        let dev = q.device().clone();
        cuda_out(profiler::section("causal-attention", "fwd", &dev, || {
            self.forward(&q, &cuda_in(s2, l2)?, &cuda_in(s3, l3)?)
        })?)
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: see `InputGradCustomOp::bwd`.
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        profiler::section("causal-attention", "bwd", q.device(), || {
            self.backward(&q, &k, &v, &grad)
        })
    }
}

/// Row softmax of scores (..., rows, t) under a causal mask, in place of the scores' dtype:
/// row `r` is query position `i = r % t` and sees keys `0..=i` (with a window `W > 0`: keys
/// `i - W < j <= i`); masked entries are 0. Max, exponentials and the sum are f32 (f64 for
/// f64 input).
pub struct CausalSoftmax {
    /// Sequence length (row length; rows repeat positions every `t`).
    pub t: usize,
    /// Sliding window in keys, 0 for none.
    pub window: usize,
}

/// Softmax backward for [`CausalSoftmax`]: from probabilities `P` and their gradient `dP`
/// (same shape), `dS = scale * P * (dP - rowsum(P * dP))`, 0 where masked.
pub struct CausalSoftmaxGrad {
    /// Sequence length, as [`CausalSoftmax::t`].
    pub t: usize,
    /// Factor applied to the result (the attention scale).
    pub scale: f64,
    /// Sliding window, as [`CausalSoftmax::window`].
    pub window: usize,
}

fn check_rows(l: &Layout, t: usize, what: &str) -> Result<usize> {
    let n = l.shape().elem_count();
    if t == 0 || l.shape().dims().last() != Some(&t) {
        candle_core::bail!("{what}: last dimension must be {t}, got {:?}", l.shape());
    }
    Ok(n / t)
}

impl CausalSoftmaxGrad {
    /// Rows of `P` (`l1`), checked against `dP` (`l2`).
    fn check(&self, l1: &Layout, l2: &Layout) -> Result<usize> {
        let rows = check_rows(l1, self.t, self.name())?;
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
        Ok(cpu::softmax(xs[0], self.t, self.window))
    }
}

impl CpuLoops for CausalSoftmaxGrad {
    const NAME: &'static str = "causal-softmax-grad";
    fn f<T: WithDType>(&self, xs: &[&[T]]) -> Result<Vec<T>> {
        Ok(cpu::softmax_grad(
            xs[0],
            xs[1],
            self.t,
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
        check_rows(l, self.t, self.name())?;
        Ok((cpu_map(self, &[(s, l)])?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = check_rows(l, self.t, self.name())?;
        let range = contiguous_range(l, self.name())?;
        let out = cuda::softmax((s, range), rows, self.t, self.window)?;
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
            (self.t, self.window),
            self.scale as f32,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

mod cpu {
    //! The kernels' formulas as loops (f64 statistics, one rounding to the storage dtype).
    use candle_core::WithDType;

    /// The visible keys `lo..valid` of row `r` (query position `r % t`) under window `w`.
    fn span(r: usize, t: usize, w: usize) -> (usize, usize) {
        let valid = r % t + 1;
        let lo = if w > 0 { valid.saturating_sub(w) } else { 0 };
        (lo, valid)
    }

    pub fn softmax<T: WithDType>(s: &[T], t: usize, w: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); s.len()];
        for (r, (row, o)) in s.chunks(t).zip(out.chunks_mut(t)).enumerate() {
            let (lo, valid) = span(r, t, w);
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

    pub fn softmax_grad<T: WithDType>(p: &[T], dp: &[T], t: usize, scale: f64, w: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); p.len()];
        for (r, ((pr, dr), o)) in p
            .chunks(t)
            .zip(dp.chunks(t))
            .zip(out.chunks_mut(t))
            .enumerate()
        {
            let (lo, valid) = span(r, t, w);
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

#[cfg(test)]
mod generic {
    //! Attention from differentiable candle primitives, the tests' reference: HF `repeat_kv`,
    //! `softmax(Q K^T / sqrt(d) + mask) V` with an additive -1e30 causal mask.
    use candle_core::{D, Result, Tensor};

    /// Attention of `q` (b, qh, t, d) over `k`, `v` (b, kvh, t, d), differentiable.
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, qh, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let g = qh / kvh;
        let rep = |x: &Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?
                .broadcast_as((b, kvh, g, t, d))?
                .reshape((b, qh, t, d))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let mask: Vec<f64> = (0..t * t)
            .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
            .collect();
        let s = s.broadcast_add(&Tensor::from_vec(mask, (t, t), q.device())?)?;
        let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        p.matmul(&v)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launchers of `cuda/kernels/attention.cu`: one 256-thread block per score row.
    use crate::engine::cuda::launch::{Arg, Buf, Module, launch, per_row};
    use crate::engine::cuda::{kernel_name, source};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, Result};

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

    /// [`super::CausalSoftmax`] over `rows` score rows of length `t`, window `w` (0: none).
    pub fn softmax((s, range): In, rows: usize, t: usize, w: usize) -> Result<CudaStorage> {
        let dev = s.device();
        let name = kernel_name("causal_softmax", s.dtype(), "causal softmax")?;
        let out = Buf::alloc(dev, s.dtype(), range.1 - range.0)?;
        let args = [
            Buf::view(s, range)?.arg(),
            out.arg(),
            Arg::I32(t as i32),
            Arg::I32(w.min(i32::MAX as usize) as i32),
        ];
        launch(dev, &MODULE, &name, cfg(rows)?, &args)?;
        out.into_storage()
    }

    /// [`super::CausalSoftmaxGrad`] of `P`, `dP` (`rows` rows of length `t`).
    pub fn softmax_grad(
        (p, pr): In,
        (dp, dpr): In,
        rows: usize,
        (t, w): (usize, usize),
        scale: f32,
    ) -> Result<CudaStorage> {
        if p.dtype() != dp.dtype() {
            candle_core::bail!("causal-softmax-grad: P and dP dtypes differ");
        }
        let dev = p.device();
        let name = kernel_name("causal_softmax_grad", p.dtype(), "causal softmax")?;
        let out = Buf::alloc(dev, p.dtype(), pr.1 - pr.0)?;
        let args = [
            Buf::view(p, pr)?.arg(),
            Buf::view(dp, dpr)?.arg(),
            out.arg(),
            Arg::I32(t as i32),
            Arg::F32(scale),
            Arg::I32(w.min(i32::MAX as usize) as i32),
        ];
        launch(dev, &MODULE, &name, cfg(rows)?, &args)?;
        out.into_storage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::{max_abs_diff, rand_uniform};
    use candle_core::{DType, Var};

    fn rand(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        rand_uniform(&[shape.0, shape.1, shape.2, shape.3], seed, -1.0, 1.0)
    }

    #[test]
    fn fused_attention_matches_the_naive_reference_forward_and_backward() {
        let (b, qh, kvh, t, d) = (2, 6, 2, 7, 8);
        let q = Var::from_tensor(&rand((b, qh, t, d), 1)).unwrap();
        let k = Var::from_tensor(&rand((b, kvh, t, d), 2)).unwrap();
        let v = Var::from_tensor(&rand((b, kvh, t, d), 3)).unwrap();
        let w = rand((b, qh, t, d), 4);
        let fused = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            AttentionSpec::causal(d),
        )
        .unwrap();
        let reference = generic::attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-12);
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = gf.get(x.as_tensor()).unwrap();
            let r = gr.get(x.as_tensor()).unwrap();
            let err = max_abs_diff(a, r);
            assert!(err < 1e-12, "d{name}: max abs error {err}");
        }
    }

    #[test]
    fn masked_probabilities_are_zero_and_rows_sum_to_one() {
        let s = rand((1, 1, 5, 5), 9).to_dtype(DType::F32).unwrap();
        let p = s
            .apply_op1_no_bwd(&CausalSoftmax { t: 5, window: 0 })
            .unwrap();
        let p: Vec<Vec<f32>> = p.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        for (r, row) in p.iter().enumerate() {
            assert!(row[r + 1..].iter().all(|&x| x == 0.0), "row {r}: {row:?}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {r} sums to {sum}");
        }
    }

    #[test]
    fn half_precision_cpu_path_stays_close_to_f64() {
        let (b, qh, kvh, t, d) = (1, 4, 2, 9, 16);
        let (q, k, v) = (
            rand((b, qh, t, d), 5),
            rand((b, kvh, t, d), 6),
            rand((b, kvh, t, d), 7),
        );
        let reference = generic::attention(&q, &k, &v).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let c = |x: &Tensor| x.to_dtype(dt).unwrap();
            let o = causal_attention(&c(&q), &c(&k), &c(&v), AttentionSpec::causal(d))
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let err = max_abs_diff(&o, &reference);
            assert!(err < 2e-2, "{dt:?}: max abs error {err}");
        }
    }
}

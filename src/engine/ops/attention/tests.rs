//! Attention against a naive reference, chunked against unchunked.

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

/// Attention through candle's graph with chunk length `chunk`.
fn chunked(q: &Var, k: &Var, v: &Var, spec: AttentionSpec, chunk: usize) -> Tensor {
    q.as_tensor()
        .apply_op3(k.as_tensor(), v.as_tensor(), Attention { spec, chunk })
        .unwrap()
}

#[test]
fn query_chunks_cover_the_row_in_order() {
    assert_eq!(query_chunks(7, 3), [(0, 3), (3, 3), (6, 1)]);
    assert_eq!(query_chunks(7, 0), [(0, 7)]);
    assert_eq!(query_chunks(7, 7), [(0, 7)]);
    assert_eq!(query_chunks(2048, 512).len(), 4);
}

/// Chunked attention (chunks of 3 and 2 over 7 positions, uneven last chunk) equals the
/// naive reference, forward and backward, and the unchunked op with a sliding window and
/// with soft-capping.
#[test]
fn chunked_attention_matches_unchunked_and_the_reference() {
    let (b, qh, kvh, t, d) = (2, 6, 2, 7, 8);
    let q = Var::from_tensor(&rand((b, qh, t, d), 11)).unwrap();
    let k = Var::from_tensor(&rand((b, kvh, t, d), 12)).unwrap();
    let v = Var::from_tensor(&rand((b, kvh, t, d), 13)).unwrap();
    let w = rand((b, qh, t, d), 14);
    let grads = |o: &Tensor| (o * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let reference = generic::attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
    let gr = grads(&reference);
    let variants = [
        AttentionSpec::causal(d),
        AttentionSpec {
            window: Some(3),
            ..AttentionSpec::causal(d)
        },
        AttentionSpec {
            softcap: Some(2.0),
            ..AttentionSpec::causal(d)
        },
    ];
    for (i, spec) in variants.into_iter().enumerate() {
        let whole = chunked(&q, &k, &v, spec, 0);
        let gw = grads(&whole);
        if i == 0 {
            assert!(max_abs_diff(&whole, &reference) < 1e-12);
        }
        for chunk in [3, 2] {
            let o = chunked(&q, &k, &v, spec, chunk);
            let err = max_abs_diff(&o, &whole);
            assert!(err < 1e-12, "{spec:?} chunk {chunk}: output error {err}");
            let g = grads(&o);
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g.get(x.as_tensor()).unwrap();
                let e = max_abs_diff(a, gw.get(x.as_tensor()).unwrap());
                assert!(e < 1e-12, "{spec:?} chunk {chunk}: d{name} error {e}");
                if i == 0 {
                    let e = max_abs_diff(a, gr.get(x.as_tensor()).unwrap());
                    assert!(e < 1e-12, "chunk {chunk}: d{name} vs reference {e}");
                }
            }
        }
    }
}

#[test]
fn masked_probabilities_are_zero_and_rows_sum_to_one() {
    let s = rand((1, 1, 5, 5), 9).to_dtype(DType::F32).unwrap();
    let p = s
        .apply_op1_no_bwd(&CausalSoftmax {
            t: 5,
            keys: 5,
            q0: 0,
            window: 0,
        })
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

/// Several chunks in f32 and bf16 (the f32 running sums of `dK`/`dV`) stay as close to the
/// f64 reference as one chunk does.
#[test]
fn chunked_half_and_single_precision_stay_close_to_f64() {
    let (b, qh, kvh, t, d) = (1, 4, 2, 9, 16);
    let w = rand((b, qh, t, d), 24);
    let inputs = [
        rand((b, qh, t, d), 21),
        rand((b, kvh, t, d), 22),
        rand((b, kvh, t, d), 23),
    ];
    let grads_at = |dt: DType, chunk: usize| -> Vec<Tensor> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap())
            .collect();
        let o = chunked(
            &vars[0],
            &vars[1],
            &vars[2],
            AttentionSpec::causal(d),
            chunk,
        );
        let g = (o.to_dtype(DType::F64).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![o.to_dtype(DType::F64).unwrap()];
        for v in &vars {
            out.push(g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap());
        }
        out
    };
    let reference = grads_at(DType::F64, 0);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
        let whole = grads_at(dt, 0);
        let chunks = grads_at(dt, 4);
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            let e1 = max_abs_diff(&whole[i], &reference[i]);
            let e4 = max_abs_diff(&chunks[i], &reference[i]);
            assert!(e4 < tol, "{dt:?} {name}: chunked error {e4}");
            assert!(
                e4 <= 2.0 * e1 + 1e-6,
                "{dt:?} {name}: chunked {e4} vs whole {e1}"
            );
        }
    }
}

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

//! The terms of the memory model, each as the list of tensors the engine allocates for it
//! (shapes from the code named in each function's doc).

use super::MemoryPoint;
use crate::engine::nf4::{ABSMAX_BLOCK, NF4_BLOCK};
use crate::engine::optim::{MIN_8BIT_SIZE, STATE_BLOCK};
use crate::spec::{DeviceKind, LoraModule, Optimizer, Precision};

/// `count` tensors of `bytes` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Alloc {
    pub count: u64,
    pub bytes: u64,
}

impl Alloc {
    fn new(count: usize, bytes: usize) -> Self {
        Self {
            count: count as u64,
            bytes: bytes as u64,
        }
    }

    /// All bytes of these tensors.
    pub fn bytes(&self) -> u64 {
        self.count * self.bytes
    }
}

/// Bytes per element of the compute dtype.
pub(super) fn dtype_bytes(p: Precision) -> usize {
    match p {
        Precision::Fp32 => 4,
        Precision::Fp16 | Precision::Bf16 => 2,
    }
}

/// Bytes of an NF4 weight of `n` elements (`Nf4Weight::bytes`): packed codes (two per byte),
/// one 8-bit absmax per [`NF4_BLOCK`], one f32 second-level absmax per [`ABSMAX_BLOCK`]
/// blocks, and the f32 offset.
pub(super) fn nf4_allocs(n: usize) -> [Alloc; 3] {
    let blocks = n.div_ceil(NF4_BLOCK);
    [
        Alloc::new(1, n.div_ceil(2)),
        Alloc::new(1, blocks),
        Alloc::new(1, 4 * blocks.div_ceil(ABSMAX_BLOCK) + 4),
    ]
}

/// The base weights (`Model::new_quantized`, `Model::base_weight_bytes`): embedding (vocab,
/// hidden), final norm, `lm_head` unless tied, and per layer two norms, the seven projections
/// (dense in the compute dtype, or NF4 with `quant = nf4`) and q/k/v biases when
/// `attention_bias`.
pub(super) fn base_weights(p: &MemoryPoint) -> Vec<Alloc> {
    let c = p.config;
    let e = dtype_bytes(p.precision);
    let h = c.hidden_size;
    let mut v = vec![Alloc::new(1, c.vocab_size * h * e), Alloc::new(1, h * e)];
    if !c.tie_word_embeddings {
        v.push(Alloc::new(1, c.vocab_size * h * e));
    }
    let l = c.num_hidden_layers;
    v.push(Alloc::new(2 * l, h * e));
    // Per stored module (Phi-3: fused qkv_proj and gate_up_proj), as the checkpoint holds them.
    for &m in c.projections() {
        let (out, inp) = c.projection_dims(m);
        match p.quant {
            crate::spec::Quant::None => v.push(Alloc::new(l, out * inp * e)),
            crate::spec::Quant::Nf4 => v.extend(nf4_allocs(out * inp).map(|a| Alloc {
                count: a.count * l as u64,
                ..a
            })),
        }
        if c.projection_bias(m) {
            v.push(Alloc::new(l, out * e));
        }
    }
    v
}

/// Element counts of every adapter tensor, A (r, in) then B (out, r) per adapted module per
/// layer (`lora::new_adapter`): one adapter per stored module whose computations are all
/// targeted, so Phi-3's `qkv_proj` is one A (r, hidden) and one B (q + 2 kv, r), not three.
pub(super) fn adapter_tensors(p: &MemoryPoint) -> Vec<(usize, usize)> {
    let targets = LoraModule::expand(p.lora_targets);
    let mut v = Vec::new();
    for &m in p.config.projections() {
        if !m.targets().iter().all(|t| targets.contains(t)) {
            continue;
        }
        let (out, inp) = p.config.projection_dims(m);
        v.push((p.config.num_hidden_layers, p.lora_rank * inp));
        v.push((p.config.num_hidden_layers, out * p.lora_rank));
    }
    v
}

/// The adapters' f32 master weights.
pub(super) fn adapters(p: &MemoryPoint) -> Vec<Alloc> {
    adapter_tensors(p)
        .into_iter()
        .map(|(count, n)| Alloc::new(count, 4 * n))
        .collect()
}

/// Optimizer state per adapter tensor of `n` elements (`optim/`): AdamW two f32 moments;
/// AdamW8bit two moments of one byte per element plus one f32 absmax per [`STATE_BLOCK`]
/// for `n >= MIN_8BIT_SIZE`, f32 below. Paged variants hold the same bytes (in unified
/// memory on CUDA).
pub(super) fn optimizer_state(p: &MemoryPoint) -> Vec<Alloc> {
    let eight_bit = matches!(
        p.optimizer,
        Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit
    );
    adapter_tensors(p)
        .into_iter()
        .map(|(count, n)| {
            let moment = if eight_bit && n >= MIN_8BIT_SIZE {
                n + 4 * n.div_ceil(STATE_BLOCK)
            } else {
                4 * n
            };
            Alloc::new(2 * count, moment)
        })
        .collect()
}

/// Tensors alive at one moment of a step, on top of the resident weights, adapters and
/// optimizer state.
#[derive(Debug, Clone)]
pub(super) struct Phase {
    /// `forward`, `loss backward` or `layer backward`.
    pub name: &'static str,
    /// Activations kept for backward.
    pub kept: u64,
    /// The largest op's working set.
    pub transient: u64,
    /// Adapter gradients alive.
    pub grads: u64,
}

impl Phase {
    /// All bytes of the phase.
    pub fn total(&self) -> u64 {
        self.kept + self.transient + self.grads
    }
}

/// Sizes of one step's activation tensors in bytes: `n = batch * seq` tokens.
struct Shapes {
    /// (n, hidden).
    nh: usize,
    /// (n, q_heads * head_dim).
    nq: usize,
    /// (n, kv_heads * head_dim).
    nk: usize,
    /// (n, intermediate).
    ni: usize,
    /// One attention score matrix of the largest query chunk (batch, q_heads, chunk, seq)
    /// (`ops/attention/`'s [`query_chunk`](crate::engine::ops::query_chunk)).
    scores: usize,
    /// Whether attention runs in more than one query chunk: `dK` and `dV` are then summed
    /// in f32 (n, kv width x 4 bytes: the two running sums, the chunk's two padded copies
    /// and a new sum, five at the add; on the direct CUDA path, `ops/attention/direct.rs`,
    /// the GEMMs add into the two sums) and `dQ`'s chunks are concatenated.
    chunked: bool,
    /// f32 copies of (n, kv width) alive at the chunked backward's peak: 5, or 2 on the
    /// direct CUDA path (no score soft-capping, [`crate::engine::cuda::direct_attention_on`]).
    kv_sums: usize,
    /// (n, kv_heads * head_dim) in f32.
    nk32: usize,
    /// Rows of one loss chunk times vocab, in the compute dtype.
    loss_chunk: usize,
    /// With final-logit soft-capping: the same chunk's elements times 4 (one f32 copy).
    capped_chunk32: Option<usize>,
    /// (intermediate)-sized buffers the MLP's backward allocates beside the layer's recorded
    /// gate, up and act: 3, or with checkpointing on CUDA with
    /// [`crate::engine::cuda::in_place_mlp_on`] and SwiGLU (`model/mlp.rs`: the SwiGLU
    /// gradients written over gate and up, the down projection's dropout over act and act
    /// freed before `dact`) 0, 1 when down has no adapter (then `dact` is allocated while act
    /// is still alive).
    mlp_ni: usize,
}

impl Shapes {
    fn new(p: &MemoryPoint) -> Self {
        let c = p.config;
        let e = dtype_bytes(p.precision);
        let n = p.batch_size * p.seq_len;
        let capped = c.final_softcap.is_some();
        let rows = crate::engine::ops::chunk_rows(c.vocab_size, capped).min(n);
        let chunk = crate::engine::ops::query_chunk();
        let tq = crate::engine::ops::query_chunks(p.seq_len, chunk)
            .first()
            .map_or(p.seq_len, |&(_, tq)| tq);
        let loss_e = if p.device == DeviceKind::Cuda { e } else { 4 };
        Self {
            nh: n * c.hidden_size * e,
            nq: n * c.num_attention_heads * c.head_dim * e,
            nk: n * c.num_key_value_heads * c.head_dim * e,
            ni: n * c.intermediate_size * e,
            scores: p.batch_size * c.num_attention_heads * tq * p.seq_len * e,
            chunked: tq < p.seq_len,
            kv_sums: if p.device == DeviceKind::Cuda
                && c.attn_softcap.is_none()
                && crate::engine::cuda::direct_attention_on()
            {
                2
            } else {
                5
            },
            nk32: n * c.num_key_value_heads * c.head_dim * 4,
            loss_chunk: rows * c.vocab_size * loss_e,
            capped_chunk32: capped.then_some(rows * c.vocab_size * 4),
            mlp_ni: if p.device == DeviceKind::Cuda
                && p.grad_checkpointing
                && c.hidden_act == crate::engine::config::Activation::Silu
                && crate::engine::cuda::in_place_mlp_on()
            {
                let down = crate::spec::LoraTarget::Down;
                usize::from(!LoraModule::expand(p.lora_targets).contains(&down))
            } else {
                3
            },
        }
    }

    /// The graph of one layer without checkpointing (`DecoderLayer::forward`, `Pass::Graph`):
    /// candle keeps every op's inputs, so every intermediate lives until backward: the input,
    /// `h1`, the o output, `x1`, `h2` and the down output (hidden); q as projected, as heads
    /// and after RoPE, the attention output as heads and flattened (q width); k as projected,
    /// as heads and after RoPE, v as projected and as heads (kv width); gate and up
    /// (intermediate), and their product unless activation and down are one node
    /// (`model/mlp.rs` `GatedDown`, `ni_kept` 2).
    fn graph_layer(&self, ni_kept: usize) -> Vec<Alloc> {
        vec![
            Alloc::new(6, self.nh),
            Alloc::new(5, self.nq),
            Alloc::new(5, self.nk),
            Alloc::new(ni_kept, self.ni),
        ]
    }

    /// One recomputed layer (`DecoderLayer::record`'s `LayerSaved`): `h1`, `x1`, `h2`
    /// (hidden), q and the attention output (q width), k and v (kv width), gate, up and
    /// their SwiGLU (intermediate).
    fn recorded_layer(&self) -> Vec<Alloc> {
        vec![
            Alloc::new(3, self.nh),
            Alloc::new(2, self.nq),
            Alloc::new(2, self.nk),
            Alloc::new(3, self.ni),
        ]
    }

    /// The largest backward working set inside one layer: the MLP's (the output gradient, the
    /// SwiGLU input gradients and the gradient of the down input: intermediate x
    /// [`Self::mlp_ni`], plus the hidden gradient; written in place, the gate and up
    /// projections' three hidden-sized buffers: `d(h2)` or one input gradient, the other, and
    /// their sum), or attention's (`ops/attention/`: probabilities, their
    /// gradient and the score gradient, three score matrices, with the grouped queries and
    /// the output gradient; with query chunks, also `dQ`'s chunks and the f32 sums of `dK`
    /// and `dV`).
    fn layer_backward_ws(&self) -> Vec<Alloc> {
        let mlp = if self.mlp_ni == 3 {
            [Alloc::new(3, self.ni), Alloc::new(2, self.nh)]
        } else {
            [Alloc::new(self.mlp_ni, self.ni), Alloc::new(3, self.nh)]
        };
        let mut attn = vec![Alloc::new(3, self.scores), Alloc::new(3, self.nq)];
        if self.chunked {
            attn.extend([Alloc::new(1, self.nq), Alloc::new(self.kv_sums, self.nk32)]);
        }
        let sum = |a: &[Alloc]| a.iter().map(Alloc::bytes).sum::<u64>();
        if sum(&mlp) >= sum(&attn) {
            mlp.to_vec()
        } else {
            attn
        }
    }
}

/// The phases of a step whose largest is the peak (see [`super::estimate`]).
pub(super) fn phases(p: &MemoryPoint) -> [Phase; 3] {
    let s = Shapes::new(p);
    let c = p.config;
    let l = c.num_hidden_layers;
    let e = dtype_bytes(p.precision);
    let sum = |a: &[Alloc]| a.iter().map(Alloc::bytes).sum::<u64>();
    let scale = |a: Vec<Alloc>, k: usize| -> Vec<Alloc> {
        a.into_iter()
            .map(|x| Alloc {
                count: x.count * k as u64,
                ..x
            })
            .collect()
    };
    // What the forward pass keeps: every layer's graph, or each checkpointed layer's input;
    // plus the final norm's input and output.
    // Without checkpointing the MLP's product is not kept where gate or up carry a graph
    // (`Mlp::forward_graph`): in every layer, except the first when only down has an adapter
    // (nothing before it is tracked there; that layer then keeps less than `graph_layer`
    // counts, as gate, up, q, k and v carry no graph: an over-count of the first layer).
    let kept: Vec<Alloc> = if p.grad_checkpointing {
        vec![Alloc::new(l + 2, s.nh)]
    } else if crate::engine::model::gated_down_on() {
        let targets = LoraModule::expand(p.lora_targets);
        let only_down = targets == [crate::spec::LoraTarget::Down];
        let mut v = scale(s.graph_layer(2), l);
        v.push(Alloc::new(2, s.nh));
        v.push(Alloc::new(usize::from(only_down), s.ni));
        v
    } else {
        let mut v = scale(s.graph_layer(3), l);
        v.push(Alloc::new(2, s.nh));
        v
    };
    // The largest op of a layer's forward: attention scores then probabilities, or a
    // dequantised NF4 weight (the largest projection) next to its input and output.
    let dequant = match p.quant {
        crate::spec::Quant::Nf4 => c
            .projections()
            .iter()
            .map(|&m| {
                let (o, i) = c.projection_dims(m);
                o * i * e
            })
            .max()
            .unwrap_or(0),
        crate::spec::Quant::None => 0,
    };
    // Chunked attention also holds the finished chunks' outputs until they are concatenated.
    let attn_out = if s.chunked { 2 } else { 1 };
    let fwd_ws = if 2 * s.scores + attn_out * s.nq >= dequant + s.ni {
        vec![Alloc::new(2, s.scores), Alloc::new(attn_out, s.nq)]
    } else {
        vec![Alloc::new(1, dequant), Alloc::new(1, s.ni)]
    };
    // On CUDA each layer pass casts its adapters to the compute dtype in one buffer
    // (`lora::CastScope`), alive through the pass (counted in the backward also without
    // checkpointing, where the recorded projections cast for themselves: one layer's worth,
    // a slight over-count).
    let layer_casts: usize =
        if p.device == DeviceKind::Cuda && crate::engine::cuda::layer_casts_on() {
            adapter_tensors(p).iter().map(|&(_, n)| n * e).sum()
        } else {
            0
        };
    let mut fwd_ws = fwd_ws;
    fwd_ws.push(Alloc::new(1, layer_casts));
    let forward = phase("forward", &kept, fwd_ws, 0);
    // Loss backward (`ChunkedCrossEntropy::grad`): one chunk's logits and their gradient,
    // with the hidden-state gradient assembled from the chunks and concatenated.
    // Soft-capped (`with_softcap`): five f32 copies of a chunk at the gradient's peak (`z'`,
    // the row gradient, `z' / cap`, `1 - (z' / cap)^2`, their product; the raw chunk is gone
    // by then, and while capping it lives beside four f32 copies at most), in chunks of a
    // quarter of the rows.
    let loss_ws = match s.capped_chunk32 {
        Some(c32) => vec![Alloc::new(5, c32), Alloc::new(2, s.nh)],
        None => vec![Alloc::new(2, s.loss_chunk), Alloc::new(2, s.nh)],
    };
    let loss_backward = phase("loss backward", &kept, loss_ws, 0);
    // Backward of the last layer: what is kept, one layer recomputed (checkpointing) or its
    // graph, the layer's backward buffers and the flowing gradient (hidden x 2), and every
    // adapter gradient (the last layer's first, the rest soon after: counted whole).
    let mut ws = s.layer_backward_ws();
    ws.push(Alloc::new(2, s.nh));
    if p.grad_checkpointing {
        ws.extend(s.recorded_layer());
    }
    if p.quant == crate::spec::Quant::Nf4 {
        ws.push(Alloc::new(1, dequant));
    }
    ws.push(Alloc::new(1, layer_casts));
    let grads = sum(&adapters(p));
    let layer_backward = phase("layer backward", &kept, ws, grads);
    [forward, loss_backward, layer_backward]
}

fn phase(name: &'static str, kept: &[Alloc], ws: Vec<Alloc>, grads: u64) -> Phase {
    let sum = |a: &[Alloc]| a.iter().map(Alloc::bytes).sum::<u64>();
    Phase {
        name,
        kept: sum(kept),
        transient: sum(&ws),
        grads,
    }
}

/// CUDA device bytes of loading synthetic weights beyond the loaded model (`weights.rs`
/// `synth`). Drawn by the project's kernel ([`crate::engine::cuda::synth_kernel_on`]) a
/// weight is made in the compute dtype, `e n` bytes for `n` elements; with candle's `randn`
/// it is drawn in f32 and cast, `(4 + e) n`. Either way NF4 then turns the dense copy into
/// codes. While tensor `t` is made those bytes are alive on top of everything loaded before
/// it; over the load order (embedding, each layer's projections, `lm_head` unless tied; norms
/// and biases are too small to matter), the largest excess over the final weights is the
/// draw of `t` minus the final bytes of `t` and of every tensor after it. With the kernel
/// only an NF4 projection's dense copy shows (largest near the end of the load: the last
/// layer's, Llama-3.1-8B's down projection 117 MB, less the tensors after it); with `randn`
/// an untied `lm_head`, loaded last, adds its f32 draw, `4 n` (2.1 GB at Llama-3.1-8B). 0 for
/// fp32 (the draw is the tensor) and for weights read from a checkpoint.
pub(super) fn device_loading_excess(p: &MemoryPoint) -> u64 {
    let e = dtype_bytes(p.precision);
    let draw = if crate::engine::cuda::synth_kernel_on() {
        e
    } else {
        4 + e
    };
    loading_excess_drawing(p, draw)
}

/// [`device_loading_excess`] with `draw` bytes alive per element while a weight is made.
pub(super) fn loading_excess_drawing(p: &MemoryPoint, draw: usize) -> u64 {
    if !p.synthetic_weights || p.precision == Precision::Fp32 {
        return 0;
    }
    let c = p.config;
    let e = dtype_bytes(p.precision);
    let sum = |a: &[Alloc]| a.iter().map(Alloc::bytes).sum::<u64>();
    // (elements drawn, final bytes) in load order.
    let embed = c.vocab_size * c.hidden_size;
    let mut order = vec![(embed, (embed * e) as u64)];
    for _ in 0..c.num_hidden_layers {
        for &m in c.projections() {
            let (out, inp) = c.projection_dims(m);
            let n = out * inp;
            let fin = match p.quant {
                crate::spec::Quant::None => (n * e) as u64,
                crate::spec::Quant::Nf4 => sum(&nf4_allocs(n)),
            };
            order.push((n, fin));
        }
    }
    if !c.tie_word_embeddings {
        order.push((embed, (embed * e) as u64));
    }
    let mut after = 0u64;
    let mut excess = 0u64;
    for &(n, fin) in order.iter().rev() {
        after += fin;
        excess = excess.max(((draw * n) as u64).saturating_sub(after));
    }
    excess
}

/// Host bytes of loading one weight beyond the model itself (`weights.rs`, `nf4/mod.rs`),
/// the largest over the tensors: each is read or synthesised in f32 and becomes the weight as
/// is in fp32 (no extra); converted to fp16/bf16 the f32 copy is extra; a projection quantised
/// to NF4 has its f32 copy and the dense tensor in the compute dtype alive while its codes are
/// made.
pub(super) fn loading_transient(p: &MemoryPoint) -> u64 {
    let c = p.config;
    let e = dtype_bytes(p.precision);
    let f32_copy = |n: usize| {
        if p.precision == Precision::Fp32 {
            0
        } else {
            4 * n
        }
    };
    let embed = f32_copy(c.vocab_size * c.hidden_size);
    let proj = c
        .projections()
        .iter()
        .map(|&m| {
            let (o, i) = c.projection_dims(m);
            match p.quant {
                crate::spec::Quant::None => f32_copy(o * i),
                crate::spec::Quant::Nf4 => 4 * o * i + e * o * i,
            }
        })
        .max()
        .unwrap_or(0);
    embed.max(proj) as u64
}

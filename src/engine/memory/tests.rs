//! Each term against sizes computed by hand for the tiny preset (hidden 256, intermediate 704,
//! 4 layers, 8 query / 2 kv heads of 32, vocab 512, tied, q/k/v biases), and against the
//! engine's own accounting of a model and optimizer built on the CPU.

use super::*;
use crate::engine::config::ModelSource;
use crate::engine::lora::LoraConfig;
use crate::engine::model::Model;
use crate::engine::optim::{AdamWConfig, AnyOptimizer};
use crate::engine::weights::WeightSource;
use candle_core::{DType, Device};

fn tiny() -> ModelConfig {
    ModelSource::resolve("tiny").unwrap().config
}

fn point(cfg: &ModelConfig, quant: Quant, optimizer: Optimizer, ckpt: bool) -> MemoryPoint<'_> {
    MemoryPoint {
        config: cfg,
        lora_rank: 8,
        lora_targets: &[LoraModule::AllLinear],
        quant,
        precision: Precision::Fp32,
        batch_size: 2,
        seq_len: 64,
        optimizer,
        grad_checkpointing: ckpt,
        device: DeviceKind::Cpu,
        cuda_context: None,
        synthetic_weights: true,
    }
}

/// Dense f32: embedding 512x256 (tied), final norm, per layer two norms, projections of
/// 704,512 elements and 384 bias elements: 11,811,840 bytes (2,952,960 parameters x 4).
/// NF4: per layer 363,464 bytes of codes and statistics (q and o 33,812, k and v 8,456,
/// gate, up and down 92,976) plus norms and biases: 1,993,504 bytes.
#[test]
fn base_weights_by_hand() {
    let c = tiny();
    let dense = estimate(&point(&c, Quant::None, Optimizer::AdamW, false));
    assert_eq!(dense.weights, 11_811_840);
    assert_eq!(dense.weights, 4 * c.num_parameters() as u64);
    let nf4 = estimate(&point(&c, Quant::Nf4, Optimizer::AdamW, false));
    assert_eq!(nf4.weights, 1_993_504);
}

/// r = 8 on all seven projections: A 8 x (6 x 256 + 704) and B (256 + 64 + 64 + 256 + 704 +
/// 704 + 256) x 8 per layer = 36,352 parameters, 145,408 in four layers, 581,632 f32 bytes.
/// AdamW: two f32 moments, 1,163,264 bytes. AdamW8bit: only down's A and gate's and up's B
/// (5,632 elements) reach 4,096 and take 5,632 + 4 x 22 bytes per moment; the rest f32.
#[test]
fn adapters_and_optimizer_state_by_hand() {
    let c = tiny();
    let e = estimate(&point(&c, Quant::None, Optimizer::AdamW, false));
    assert_eq!(e.adapters, 581_632);
    assert_eq!(e.optimizer_state, 1_163_264);
    let e8 = estimate(&point(&c, Quant::None, Optimizer::AdamW8bit, false));
    let per_layer_moment = (6 * 2048 + 2048 + 512 + 512 + 2048 + 2048) * 4 + 3 * (5632 + 88);
    assert_eq!(e8.optimizer_state, 2 * 4 * per_layer_moment);
    let paged = estimate(&point(&c, Quant::None, Optimizer::PagedAdamW8bit, false));
    assert_eq!(paged.optimizer_state, e8.optimizer_state);
}

/// Batch 2 x 64 = 128 tokens in f32: hidden and q widths 131,072 bytes, kv 32,768,
/// intermediate 360,448. Without checkpointing a layer's graph keeps 6 + 5 + 5 + 2 tensors
/// (2,326,528 bytes: gate and up, not their product, `GatedDown`), four layers plus the final
/// norm's input and output 9,568,256; with adapters on down alone the first layer also keeps
/// the product (+360,448); with checkpointing the four layer inputs and those two, 786,432.
#[test]
fn activations_kept_by_hand() {
    assert!(crate::engine::model::gated_down_on());
    let c = tiny();
    let mut p = point(&c, Quant::None, Optimizer::AdamW, false);
    let kept = |p: &MemoryPoint| terms::phases(p)[0].kept;
    assert_eq!(kept(&p), 9_568_256);
    let down = [LoraModule::One(crate::spec::LoraTarget::Down)];
    p.lora_targets = &down;
    assert_eq!(kept(&p), 9_568_256 + 360_448);
    p.grad_checkpointing = true;
    assert_eq!(kept(&p), 786_432);
}

/// The loss chunk: 32 Mi / 512 = 65,536 rows, capped at the 128 tokens of the batch; on the
/// CPU the logits are f32: 128 x 512 x 4 = 262,144 bytes, two of them with the hidden
/// gradient (2 x 131,072) in loss backward.
#[test]
fn loss_backward_by_hand() {
    let c = tiny();
    let p = point(&c, Quant::None, Optimizer::AdamW, true);
    let ph = &terms::phases(&p)[1];
    assert_eq!(ph.name, "loss backward");
    assert_eq!(ph.transient, 2 * 262_144 + 2 * 131_072);
}

/// Soft-capped: chunks of 8 Mi / 512 = 16,384 rows, capped at 128 tokens; five f32 copies of
/// the chunk (262,144 bytes each), with the hidden gradient (2 x 131,072).
#[test]
fn capped_loss_backward_by_hand() {
    let mut c = tiny();
    c.final_softcap = Some(30.0);
    let p = point(&c, Quant::None, Optimizer::AdamW, true);
    let ph = &terms::phases(&p)[1];
    assert_eq!(ph.name, "loss backward");
    assert_eq!(ph.transient, 5 * 262_144 + 2 * 131_072);
}

/// The peak is the resident terms plus the largest phase, and on CUDA adds the pool cache (the
/// peak phase's activations and transient once more) and the context; the stated error has a
/// floor.
#[test]
fn peak_adds_up() {
    let c = tiny();
    let mut p = point(&c, Quant::None, Optimizer::AdamW, false);
    let e = estimate(&p);
    let sum = e.weights
        + e.adapters
        + e.optimizer_state
        + e.adapter_grads
        + e.activations
        + e.transient
        + e.pool_cache
        + e.overhead
        + e.loading;
    assert_eq!(e.peak, sum);
    assert_eq!(e.overhead, HOST_BASELINE);
    assert_eq!(e.pool_cache, 0);
    assert_eq!(e.stated_error(), STATED_ERROR_FLOOR);
    p.device = DeviceKind::Cuda;
    let g = estimate(&p);
    assert_eq!(g.overhead, DEFAULT_CUDA_CONTEXT);
    assert!(!g.overhead_measured);
    assert_eq!(g.pool_cache, g.activations + g.transient);
    assert_eq!(
        g.peak,
        g.weights
            + g.adapters
            + g.optimizer_state
            + g.adapter_grads
            + 2 * (g.activations + g.transient)
            + g.overhead
            + g.loading
    );
    p.cuda_context = Some(500 << 20);
    let m = estimate(&p);
    assert!(m.overhead_measured && m.overhead == 500 << 20);
    assert_eq!(e.verdict(e.peak), "fits");
    assert!(
        e.verdict(e.peak / 2).starts_with("over by"),
        "{}",
        e.verdict(e.peak / 2)
    );
}

/// On CUDA each layer pass holds one layer's adapters cast to the compute dtype
/// (`lora::CastScope`): r = 8 on all seven projections is 36,352 parameters per layer, 145,408
/// f32 bytes, in the forward's and the layer backward's working sets. At 2 x 2048 (attention in
/// query chunks) the direct attention's backward keeps two f32 sums of dK/dV (n x kv width x
/// 4 = 4,096 x 64 x 4 = 1,048,576 bytes each) where the candle-op path of the CPU keeps five.
#[test]
fn cuda_layer_casts_and_kv_sums_by_hand() {
    let c = tiny();
    let mut p = point(&c, Quant::None, Optimizer::AdamW, true);
    let cpu = terms::phases(&p);
    p.device = DeviceKind::Cuda;
    let cuda = terms::phases(&p);
    let casts = 145_408;
    assert!(crate::engine::cuda::layer_casts_on() && crate::engine::cuda::direct_attention_on());
    assert_eq!(cuda[0].transient - cpu[0].transient, casts);
    // The MLP's in-place backward as well (`cuda_in_place_mlp_backward_by_hand`).
    assert_eq!(
        cuda[2].transient + (1_343_488 - 1_179_648),
        cpu[2].transient + casts
    );
    p.seq_len = 2048;
    let cuda = terms::phases(&p)[2].transient;
    p.device = DeviceKind::Cpu;
    let cpu = terms::phases(&p)[2].transient;
    assert_eq!(cuda + 3 * 1_048_576, cpu + casts);
}

/// With checkpointing on CUDA the MLP's backward works in place (`cuda::in_place_mlp_on`):
/// tiny fp32 at 2 x 64 (n = 128 tokens; intermediate 704 x 128 x 4 = 360,448 bytes, hidden
/// 131,072) keeps no intermediate-sized buffer beside gate, up and act, so the MLP's 3 x
/// 360,448 + 2 x 131,072 = 1,343,488 bytes give way to attention's 3 scores (2 x 8 x 64 x 64 x
/// 4) + 3 q-width = 1,179,648 as the layer's working set. With intermediate 4,096 and no
/// adapter on down, the MLP keeps one (2,097,152) plus three hidden-sized: 2,490,368 against
/// 3 x 2,097,152 + 2 x 131,072 = 6,553,600 on the CPU; the casts are then those of q, k, v,
/// o, gate and up: 82,944 x 4 = 331,776 bytes. Without checkpointing nothing changes.
#[test]
fn cuda_in_place_mlp_backward_by_hand() {
    assert!(crate::engine::cuda::in_place_mlp_on());
    let c = tiny();
    let mut p = point(&c, Quant::None, Optimizer::AdamW, true);
    let cpu = terms::phases(&p)[2].transient;
    p.device = DeviceKind::Cuda;
    let cuda = terms::phases(&p)[2].transient;
    assert_eq!(cuda + (1_343_488 - 1_179_648), cpu + 145_408);
    let mut wide = tiny();
    wide.intermediate_size = 4096;
    use crate::spec::LoraTarget::*;
    let targets: Vec<LoraModule> = [Q, K, V, O, Gate, Up].map(LoraModule::One).to_vec();
    let mut p = point(&wide, Quant::None, Optimizer::AdamW, true);
    p.lora_targets = &targets;
    let cpu = terms::phases(&p)[2].transient;
    p.device = DeviceKind::Cuda;
    let cuda = terms::phases(&p)[2].transient;
    assert_eq!(cuda + (6_553_600 - 2_490_368), cpu + 331_776);
    // With down adapted too the MLP keeps no intermediate-sized buffer of its own (0 x
    // 2,097,152 + 3 x 131,072 = 393,216), so attention's 1,179,648 is the working set; the
    // casts add down's A (8 x 4,096) and B (256 x 8): 34,816 x 4 = 139,264 bytes.
    let all = [LoraModule::AllLinear];
    p.lora_targets = &all;
    let cuda = terms::phases(&p)[2].transient;
    p.device = DeviceKind::Cpu;
    let cpu = terms::phases(&p)[2].transient;
    assert_eq!(cuda + (6_553_600 - 1_179_648), cpu + 331_776 + 139_264);
    p.device = DeviceKind::Cuda;
    p.grad_checkpointing = false;
    let cuda = terms::phases(&p)[2].transient;
    p.device = DeviceKind::Cpu;
    assert_eq!(cuda, terms::phases(&p)[2].transient + 331_776 + 139_264);
}

/// Synthetic weights on CUDA, bf16. Drawn by candle's `randn` in f32 and cast (6 bytes per
/// element while made), the largest excess over the loaded model is the last tensor's f32 draw.
/// Tied (tiny as shipped) the last is the last layer's down projection, 704 x 256 = 180,224
/// elements: 4 x 180,224 = 720,896 bytes; untied it is `lm_head`, 512 x 256: 524,288 bytes
/// (the down projection then has `lm_head`'s 262,144 bf16 bytes after it: 6 x 180,224 - 2 x
/// 180,224 - 262,144 = 458,752, less). Drawn by the kernel straight into bf16 (the default), a
/// dense weight is its own draw: nothing; NF4 keeps the last down projection's dense copy
/// (2 x 180,224) beside its codes (92,976): 267,472 tied, and untied less `lm_head`'s 262,144
/// after it: 5,328. None in fp32 or from a checkpoint.
#[test]
fn synthetic_load_excess_by_hand() {
    assert!(crate::engine::cuda::synth_kernel_on());
    let mut c = tiny();
    let mut p = point(&c, Quant::None, Optimizer::AdamW, true);
    p.precision = Precision::Bf16;
    p.device = DeviceKind::Cuda;
    assert_eq!(terms::loading_excess_drawing(&p, 6), 720_896);
    assert_eq!(terms::device_loading_excess(&p), 0);
    p.quant = Quant::Nf4;
    assert_eq!(terms::device_loading_excess(&p), 267_472);
    c.tie_word_embeddings = false;
    let mut u = point(&c, Quant::None, Optimizer::AdamW, true);
    u.precision = Precision::Bf16;
    u.device = DeviceKind::Cuda;
    assert_eq!(terms::loading_excess_drawing(&u, 6), 524_288);
    u.quant = Quant::Nf4;
    assert_eq!(terms::device_loading_excess(&u), 5_328);
    // Small next to the step here, so the estimate adds nothing.
    assert_eq!(estimate(&u).loading, 0);
    u.synthetic_weights = false;
    assert_eq!(terms::loading_excess_drawing(&u, 6), 0);
    u.synthetic_weights = true;
    u.precision = Precision::Fp32;
    assert_eq!(terms::loading_excess_drawing(&u, 6), 0);
}

/// The model's weight and optimizer terms equal what the engine itself reports for a model
/// built on the CPU (`Model::base_weight_bytes`, the trainable parameter count, the
/// optimizer's `state_bytes`), dense and NF4, for each optimizer.
#[test]
fn terms_match_the_engine_accounting() {
    let phi3 = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf/phi3");
    // Phi-3: fused qkv_proj and gate_up_proj, one adapter each.
    for c in [tiny(), ModelSource::resolve(phi3).unwrap().config] {
        engine_accounting(&c);
    }
}

fn engine_accounting(c: &ModelConfig) {
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec![LoraModule::AllLinear],
    };
    for quant in [Quant::None, Quant::Nf4] {
        let model = Model::new_quantized(
            c,
            &lora,
            &WeightSource::Synthetic { seed: 1 },
            DType::F32,
            &Device::Cpu,
            1,
            quant,
        )
        .unwrap();
        for opt in [
            Optimizer::AdamW,
            Optimizer::AdamW8bit,
            Optimizer::PagedAdamW,
            Optimizer::PagedAdamW8bit,
        ] {
            let e = estimate(&point(c, quant, opt, false));
            assert_eq!(e.weights, model.base_weight_bytes() as u64, "{quant:?}");
            assert_eq!(
                e.adapters,
                4 * model.param_counts().trainable as u64,
                "{:?}",
                c.family
            );
            let o = AnyOptimizer::new(opt, model.trainable_vars(), AdamWConfig::default()).unwrap();
            assert_eq!(e.optimizer_state, o.state_bytes() as u64, "{opt:?}");
        }
    }
}

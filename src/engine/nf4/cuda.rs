//! Launchers of the NF4 dequantise kernels (`cuda/kernels/nf4.cu`: eight weights per thread
//! from one 32-bit load when the length and alignment allow, else one thread per packed byte)
//! and of the quantise kernels (`cuda/kernels/nf4_quantize.cu`: block absmax, one
//! warp per 64-block, then the packed codes, one thread per byte), with the NF4 values (and for
//! dequantisation the signed dynamic map) baked in as constants by generated headers.

use super::blockwise::signed_map;
use super::{ABSMAX_BLOCK, Dequant, NF4_BLOCK, NF4_CODE};
use crate::engine::cuda::launch::{Arg, Buf, Module, constant_table, launch};
use crate::engine::cuda::{kernel_name, source};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

static MODULE: Module = Module::new("lorascope_nf4", source::NF4)
    .with_header(header)
    .without_fmad();
static QUANTIZE: Module = Module::new("lorascope_nf4_quantize", source::NF4_QUANTIZE)
    .with_header(quantize_header)
    .without_fmad();

/// The block size and the NF4 table of `nf4_quantize.cu`.
fn quantize_header() -> String {
    format!(
        "#define NF4_BLOCK {NF4_BLOCK}\n{}",
        constant_table("NF4", &NF4_CODE)
    )
}

/// The block sizes and the two code tables of `nf4.cu`.
fn header() -> String {
    format!(
        "#define NF4_BLOCK {NF4_BLOCK}\n#define ABSMAX_BLOCK {ABSMAX_BLOCK}\n{}{}",
        constant_table("NF4", &NF4_CODE),
        constant_table("DYN", signed_map()),
    )
}

type In<'a> = (&'a CudaStorage, &'a Layout);

/// Whether the eight-weights-per-thread kernel may run (`LORASCOPE_NF4_DEQUANT8=0` keeps the
/// one-byte-per-thread kernel, for A/B timing; both give the same bits). Read once.
fn eight_per_thread() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::engine::cuda::kernel_switch(&ON, "LORASCOPE_NF4_DEQUANT8")
}

/// [`Dequant`] of (packed, qabsmax, absmax2), each a whole storage from offset 0: `op.n`
/// values of `op.dtype`.
///
/// Errors: a buffer not at offset 0, a dtype without a kernel, device errors.
pub(super) fn dequantize(
    op: &Dequant,
    (p, pl): In,
    (q, ql): In,
    (a, al): In,
) -> Result<(CudaStorage, Shape)> {
    if pl.start_offset() != 0 || ql.start_offset() != 0 || al.start_offset() != 0 {
        candle_core::bail!("nf4: buffers must start at offset 0");
    }
    let dev = p.device();
    let whole = |s: &CudaStorage, l: &Layout| Buf::view(s, (0, l.shape().elem_count()));
    let packed = whole(p, pl)?;
    let out = Buf::alloc(dev, op.dtype, op.n)?;
    let eight = op.n.is_multiple_of(8)
        && packed.ptr().is_multiple_of(4)
        && out.ptr().is_multiple_of(16)
        && eight_per_thread();
    let (root, cfg, n) = if eight {
        let threads = op.n / 8;
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        ("nf4_dequant8", cfg, threads)
    } else {
        let threads = op.n.div_ceil(2) as u32;
        (
            "nf4_dequant",
            LaunchConfig::for_num_elems(threads.max(1)),
            op.n,
        )
    };
    let name = kernel_name(root, op.dtype, "nf4")?;
    let args = [
        packed.arg(),
        whole(q, ql)?.arg(),
        whole(a, al)?.arg(),
        Arg::F32(op.offset),
        out.arg(),
        Arg::U64(n as u64),
    ];
    launch(dev, &MODULE, &name, cfg, &args)?;
    Ok((out.into_storage()?, Shape::from(op.n)))
}

/// First-level NF4 quantisation of the contiguous flat weight `w` (f32, f16 or bf16, `n`
/// elements) on its device: the packed codes (u8, `ceil(n/2)`) and the block absmax values
/// (f32, `ceil(n/64)`), exactly as `nf4::quantize`'s host loops.
///
/// Errors: `w` not a contiguous CUDA tensor, another dtype, device errors.
pub(super) fn quantize(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = w.elem_count();
    let blocks = n.div_ceil(NF4_BLOCK);
    let dev = match w.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => candle_core::bail!("nf4 quantize: expected a CUDA tensor"),
    };
    let input = crate::engine::ops::cuda_buf(w, "nf4 quantize input")?;
    let absmax = Buf::alloc(&dev, DType::F32, blocks)?;
    // One warp per block, eight warps per thread block.
    let cfg = LaunchConfig {
        grid_dim: (blocks.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = kernel_name("nf4_absmax", w.dtype(), "nf4 quantize")?;
    launch(
        &dev,
        &QUANTIZE,
        &name,
        cfg,
        &[input.arg(), absmax.arg(), Arg::U64(n as u64)],
    )?;
    let packed = Buf::alloc(&dev, DType::U8, n.div_ceil(2))?;
    let cfg = LaunchConfig::for_num_elems(n.div_ceil(2).max(1) as u32);
    let name = kernel_name("nf4_codes", w.dtype(), "nf4 quantize")?;
    let args = [input.arg(), absmax.arg(), packed.arg(), Arg::U64(n as u64)];
    launch(&dev, &QUANTIZE, &name, cfg, &args)?;
    drop(input);
    Ok((
        packed.into_tensor(n.div_ceil(2))?,
        absmax.into_tensor(blocks)?,
    ))
}

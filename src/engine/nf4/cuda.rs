//! Launcher of the NF4 dequantise kernel (`cuda/kernels/nf4.cu`): one thread per packed byte
//! (two weights), with the NF4 values and the signed dynamic map baked in as constants by the
//! module's generated header.

use super::blockwise::signed_map;
use super::{ABSMAX_BLOCK, Dequant, NF4_BLOCK, NF4_CODE};
use crate::engine::cuda::launch::{Arg, Buf, Module, constant_table, launch};
use crate::engine::cuda::{kernel_name, source};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, Layout, Result, Shape};

static MODULE: Module = Module::new("lorascope_nf4", source::NF4).with_header(header);

/// The block sizes and the two code tables of `nf4.cu`.
fn header() -> String {
    format!(
        "#define NF4_BLOCK {NF4_BLOCK}\n#define ABSMAX_BLOCK {ABSMAX_BLOCK}\n{}{}",
        constant_table("NF4", &NF4_CODE),
        constant_table("DYN", signed_map()),
    )
}

type In<'a> = (&'a CudaStorage, &'a Layout);

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
    let threads = op.n.div_ceil(2) as u32;
    let cfg = LaunchConfig::for_num_elems(threads.max(1));
    let name = kernel_name("nf4_dequant", op.dtype, "nf4")?;
    let out = Buf::alloc(dev, op.dtype, op.n)?;
    let args = [
        whole(p, pl)?.arg(),
        whole(q, ql)?.arg(),
        whole(a, al)?.arg(),
        Arg::F32(op.offset),
        out.arg(),
        Arg::U64(op.n as u64),
    ];
    launch(dev, &MODULE, &name, cfg, &args)?;
    Ok((out.into_storage()?, Shape::from(op.n)))
}

//! Two LoRAs on one base model as one: per module, `s1 up1 down1 + s2 up2 down2` is exactly
//! `[s1 up1, s2 up2] @ [down1; down2]`, a LoRA of rank r1 + r2 with scale 1.

use super::{LoraError, LoraFile, LoraModule, LoraTarget};
use crate::Tensor32;

/// `a` and `b` combined exactly: modules both adapt are stacked (ranks added, each scale folded
/// into its half of `up`, alpha = total rank); modules only one adapts keep their own rank and
/// alpha. Format, metadata and dtype are `a`'s (the user's LoRA, written back in its own form).
pub fn stack(a: &LoraFile, b: &LoraFile) -> Result<LoraFile, LoraError> {
    let mut modules = a.modules.clone();
    for (target, mb) in &b.modules {
        let combined = match a.modules.get(target) {
            Some(ma) => stack_module(target, ma, mb)?,
            None => mb.clone(),
        };
        modules.insert(target.clone(), combined);
    }
    Ok(LoraFile { modules, ..a.clone() })
}

fn stack_module(target: &LoraTarget, a: &LoraModule, b: &LoraModule) -> Result<LoraModule, LoraError> {
    let error = |reason: String| LoraError::Module { target: target.to_string(), reason };
    a.check().and(b.check()).map_err(error)?;
    let (da, db) = (&a.down.shape, &b.down.shape);
    let (ua, ub) = (&a.up.shape, &b.up.shape);
    // check() made both 2-D or both 4-D, with up [out, r(, 1, 1)]; the rest must agree.
    if da.len() != db.len() || da[1..] != db[1..] || ua[0] != ub[0] {
        return Err(error(format!(
            "cannot stack down {da:?} / up {ua:?} with down {db:?} / up {ub:?}: only the rank \
             may differ"
        )));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let rank = ra + rb;
    // down stacks along its first axis, which is contiguous in row-major order.
    let mut down_shape = da.clone();
    down_shape[0] = rank;
    let down = Tensor32 { shape: down_shape, data: [a.down.data.as_slice(), &b.down.data].concat() };
    // up stacks along its second axis: each output row is a's row then b's, scaled.
    let (sa, sb) = (a.scale(), b.scale());
    let mut up_shape = ua.clone();
    up_shape[1] = rank;
    let mut data = Vec::with_capacity(ua[0] * rank);
    for (row_a, row_b) in a.up.data.chunks_exact(ra).zip(b.up.data.chunks_exact(rb)) {
        data.extend(row_a.iter().map(|v| v * sa));
        data.extend(row_b.iter().map(|v| v * sb));
    }
    Ok(LoraModule { down, up: Tensor32 { shape: up_shape, data }, alpha: Some(rank as f32) })
}

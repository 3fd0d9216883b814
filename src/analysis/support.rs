//! What the runtimes kdgraph writes for accept of a model as a whole: the opset and IR versions
//! of ONNX Runtime Training 1.19, checked when a model is analysed so that `inspect`, a dry run
//! and `merge` agree.

use crate::error::{Error, Result};
use crate::onnx::{pb, proto};

/// The opsets ONNX Runtime Training 1.19 accepts.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;
/// The newest IR version ONNX Runtime Training 1.19 accepts.
pub const MAX_IR_VERSION: i64 = 10;

/// The model's (opset, IR version), or the error that says how to re-export it.
pub fn check_versions(model: &pb::ModelProto, shown: &str) -> Result<(i64, i64)> {
    let opset = proto::onnx_opset(model);
    if !OPSETS.contains(&opset) {
        return Err(Error::unsupported(format!(
            "`{shown}` uses ONNX opset {opset}; ONNX Runtime Training 1.19 needs {} to {}: \
             re-export it with torch.onnx.export(..., opset_version=17)",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    if model.ir_version > MAX_IR_VERSION {
        return Err(Error::unsupported(format!(
            "`{shown}` has IR version {}, newer than the {MAX_IR_VERSION} ONNX Runtime Training 1.19 reads; \
             re-export it with an older onnx, or set ir_version to {MAX_IR_VERSION} with onnx.save",
            model.ir_version
        )));
    }
    Ok((opset, model.ir_version))
}

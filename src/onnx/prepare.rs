//! A decoded model put into the form kdgraph works on: validated, its input shape fixed where
//! asked, its BatchNorms in inference form.

use super::io::LoadedModel;
use super::{normalize, proto, validate};
use crate::error::Result;

/// A model read from disk and put into the form kdgraph works on (inference-form BatchNorm).
pub struct PreparedModel {
    pub loaded: LoadedModel,
    /// Running statistics of BatchNorms that were rewritten from training mode (to be frozen).
    pub running_statistics: Vec<String>,
}

/// Validates and normalises a decoded model.
pub fn prepare(mut loaded: LoadedModel, input_shape: Option<&[i64]>) -> Result<PreparedModel> {
    let shown = loaded.display();
    let mut graph = loaded
        .proto
        .graph
        .take()
        .expect("load_model guarantees a graph");
    normalize::sequence_splits(&mut graph, proto::onnx_opset(&loaded.proto));
    validate::validate(&mut graph, &loaded.proto, &shown)?;
    normalize::inline_constant_aliases(&mut graph);
    if let Some(dims) = input_shape {
        normalize::fix_input_shape(&mut graph, dims, &shown)?;
    }
    let running_statistics = normalize::inference_batchnorm(&mut graph, &shown)?;
    loaded.proto.graph = Some(graph);
    Ok(PreparedModel {
        loaded,
        running_statistics,
    })
}

//! CRD (contrastive representation distillation): NCE over memory banks of embeddings.

use super::connector::features;
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Crd;

/// RepDistiller's `feat_dim`.
const EMBED_DIM: i64 = 128;

impl Method for Crd {
    fn id(&self) -> &'static str {
        "crd"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn remark(&self) -> Option<&'static str> {
        Some("needs the data loader's sample indices and contrast indices, and carries two memory banks as state inputs and outputs")
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 0.8 }
    }

    /// A trainable linear to 128 then L2 normalisation on each side.
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let embed = |info: &TensorInfo| -> Result<Vec<Layer>> {
            Ok(vec![Layer::Linear { in_features: features(info)?, out_features: EMBED_DIM }, Layer::L2Normalize])
        };
        Ok(vec![
            Connector { name: "embed", side: Side::Student, layers: embed(student)? },
            Connector { name: "embed", side: Side::Teacher, layers: embed(teacher)? },
        ])
    }
}

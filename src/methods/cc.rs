//! CC (correlation congruence, RepDistiller form): embeddings of both nets, product of adjacent
//! samples' absolute differences.

use super::connector::features;
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Cc;

/// RepDistiller's `feat_dim`.
const EMBED_DIM: i64 = 128;

impl Method for Cc {
    fn id(&self) -> &'static str {
        "cc"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 0.02 }
    }

    /// A trainable linear to 128 on each side (the teacher-side one is trained too).
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let linear = |info: &TensorInfo| -> Result<Vec<Layer>> {
            Ok(vec![Layer::Linear { in_features: features(info)?, out_features: EMBED_DIM }])
        };
        Ok(vec![
            Connector { name: "embed", side: Side::Student, layers: linear(student)? },
            Connector { name: "embed", side: Side::Teacher, layers: linear(teacher)? },
        ])
    }
}

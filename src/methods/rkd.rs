//! RKD (relational KD): distance and angle relations between the embeddings of a batch.

use super::{Method, TapKind, Weights};

pub struct Rkd;

impl Method for Rkd {
    fn id(&self) -> &'static str {
        "rkd"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 1.0 }
    }
}

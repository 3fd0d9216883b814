//! PKT (probabilistic knowledge transfer): cosine-similarity distributions of the embeddings.

use super::{Method, TapKind, Weights};

pub struct Pkt;

impl Method for Pkt {
    fn id(&self) -> &'static str {
        "pkt"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 30000.0 }
    }
}

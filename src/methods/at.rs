//! AT (attention transfer, p = 2): normalised spatial attention maps of every stage end.

use super::{Method, TapKind, Weights};

pub struct At;

impl Method for At {
    fn id(&self) -> &'static str {
        "at"
    }

    fn taps(&self) -> TapKind {
        TapKind::StageEnds
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 1000.0 }
    }

    fn pools(&self) -> bool {
        true
    }
}

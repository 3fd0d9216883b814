//! SP (similarity preserving): batch similarity matrices of the last spatial map.

use super::{Method, TapKind, Weights};

pub struct Sp;

impl Method for Sp {
    fn id(&self) -> &'static str {
        "sp"
    }

    fn taps(&self) -> TapKind {
        TapKind::LastSpatial
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 3000.0 }
    }
}
